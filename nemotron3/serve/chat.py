"""`nemotron3 chat MODEL`: an interactive terminal chat; reasoning is shown dimmed, tokens stream.

Commands: /think on|off, /budget N|off, /effort none|minimal|low|medium|high, /tools on|off, /reset,
/exit (or Ctrl-D). The engine runs in-process (AsyncLLM + the same reasoning-budget driver the server uses).
With tools on (`--tools`), the demo tools of nemotron3/serve/tools.py are offered to the model; its tool
calls are run locally, shown with their results, and the model answers again (at most `max_tool_rounds`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json

from rich.console import Console

from nemotron3.engine.reasoning import ReasoningConfig, ThinkTokens, prompt_opens_thinking, stream_with_budget
from nemotron3.engine.sampling_params import SamplingParams
from nemotron3.serve.parsers import ReasoningStreamParser, ToolCallStreamParser, parse_tool_calls
from nemotron3.serve.tools import DEMO_TOOLS, describe_call, run_tool

HELP = "commands: /think on|off  /budget N|off  /effort LEVEL  /tools on|off  /reset  /exit"


class ChatSession:
    """Conversation state + settings; `turn(text)` streams one assistant reply to the console."""

    def __init__(self, client, console: Console, params: SamplingParams, system: str | None = None,
                 tools: list[dict] | None = None, max_tool_rounds: int = 3) -> None:  # fmt: skip
        self.client, self.console, self.params = client, console, params
        self.tools = list(tools) if tools else None
        self.max_tool_rounds = max_tool_rounds
        self.think_after_tool = False  # reason again after a tool result (the default model answers directly)
        self.tokenizer = client.tokenizer
        self.think = ThinkTokens.from_tokenizer(self.tokenizer)
        self.system = system
        self.messages: list[dict] = []
        self.enable_thinking = True
        self.budget: int | None = None
        self.effort: str | None = None
        self._turns = 0
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def command(self, line: str) -> bool:
        """Apply a /command; False when the session should end."""
        parts = line.split()
        cmd, arg = parts[0], (parts[1] if len(parts) > 1 else "")
        if cmd in ("/exit", "/quit"):
            return False
        if cmd == "/reset":
            self.reset()
            self.console.print("[dim]conversation cleared[/dim]")
        elif cmd == "/think" and arg in ("on", "off"):
            self.enable_thinking = arg == "on"
        elif cmd == "/budget":
            self.budget = None if arg in ("", "off") else int(arg)
        elif cmd == "/effort":
            self.effort = arg or None
        elif cmd == "/tools" and arg in ("on", "off"):
            self.tools = list(DEMO_TOOLS) if arg == "on" else None
            self.console.print(f"[dim]tools {arg}[/dim]")
        else:
            self.console.print(f"[yellow]{HELP}[/yellow]")
        return True

    async def turn(self, text: str) -> str:
        """One user turn: the assistant's reply, plus tool calls run and answered (at most max_tool_rounds)."""
        mark = len(self.messages)
        self.messages.append({"role": "user", "content": text})
        try:
            for rounds in range(self.max_tool_rounds + 1):
                answer, reasoning, calls = await self._generate()
                msg = {"role": "assistant", "content": answer}
                if reasoning:
                    msg["reasoning_content"] = reasoning
                if calls and rounds == self.max_tool_rounds:
                    self.console.print(f"[yellow]tool-call limit reached ({self.max_tool_rounds} rounds); "
                                       "the calls were not run[/yellow]")  # fmt: skip
                    calls = []
                if calls:
                    msg["tool_calls"] = [_template_call(c) for c in calls]
                self.messages.append(msg)
                if not calls:
                    return answer
                for call in msg["tool_calls"]:
                    result = run_tool(call)
                    self.console.print(f"⚙ {describe_call(call)}", style="bold cyan", markup=False, highlight=False)
                    self.console.print(f"  → {result}", style="cyan", markup=False, highlight=False)
                    self.messages.append({"role": "tool", "tool_call_id": call["id"],
                                          "name": call["function"]["name"], "content": result})  # fmt: skip
        except BaseException:
            del self.messages[mark:]
            raise
        return answer  # pragma: no cover - the loop always returns

    async def _generate(self) -> tuple[str, str, list[dict]]:
        """Stream one assistant message for the conversation so far: (content, reasoning, OpenAI tool calls)."""
        # After a tool result the reply is written with thinking off unless think_after_tool: the answer
        # turn of the tool-use training data has an empty <think></think> (nemotron3.train.tasks).
        after_tool = bool(self.messages) and self.messages[-1]["role"] == "tool"
        thinking = self.enable_thinking and (self.think_after_tool or not after_tool)
        config = ReasoningConfig.resolve(thinking, None if after_tool and not thinking else self.effort, self.budget)
        prompt = self.tokenizer.apply_chat_template(self.messages, tools=self.tools, add_generation_prompt=True,
                                                    enable_thinking=config.enabled)  # fmt: skip
        prompt_ids = self.tokenizer.encode(prompt)
        room = self.client.max_model_len - len(prompt_ids)
        if room < 1:
            raise ValueError("the conversation fills the context: /reset")
        params = dataclasses.replace(self.params, max_tokens=min(self.params.max_tokens or room, room))
        in_reasoning = config.enabled and prompt_opens_thinking(prompt)
        parser = ReasoningStreamParser(in_reasoning)
        calls_parser = ToolCallStreamParser(self.tools) if self.tools else None
        reasoning, content, raw = [], [], []
        self._turns += 1
        async for piece in stream_with_budget(self.client, prompt_ids, params, config, self.think, self.tokenizer,
                                              in_reasoning=in_reasoning, request_id=f"chat-{self._turns}"):  # fmt: skip
            r, c = parser.feed(piece.text)
            self._show(r, self._visible(c, raw, calls_parser), reasoning, content)
        r, c = parser.finish()
        self._show(r, self._visible(c, raw, calls_parser), reasoning, content)
        if calls_parser is not None:
            self._show("", calls_parser.finish()[0], reasoning, content)
        self.console.print()
        text, calls = parse_tool_calls("".join(raw), self.tools) if self.tools else ("".join(raw), [])
        return (text or "").strip(), "".join(reasoning).strip(), calls

    @staticmethod
    def _visible(c: str, raw: list, calls_parser: ToolCallStreamParser | None) -> str:
        """Content to print: all of it, less the tool-call blocks when tools are on (they are shown as ⚙)."""
        raw.append(c)
        return calls_parser.feed(c)[0] if calls_parser is not None and c else c

    def _show(self, r: str, c: str, reasoning: list, content: list) -> None:
        if r:
            reasoning.append(r)
            self.console.print(r, style="dim italic", end="", markup=False, highlight=False)
        if c:
            if not content and reasoning:
                self.console.print()
            content.append(c)
            self.console.print(c, end="", markup=False, highlight=False)


def run_chat(model: str = "default", *, system: str | None = None, max_tokens: int = 512, temperature: float = 0.6,
             top_p: float = 0.95, thinking: bool = True, budget: int | None = None, tools: bool = False,
             max_tool_rounds: int = 3, messages: list[str] | None = None, **llm_options) -> int:  # fmt: skip
    """The terminal chat; with `messages`, run those user turns (or /commands) in order and exit."""
    from nemotron3.serve.api import build_client

    console = Console()
    with console.status(f"loading {model}"):
        client = build_client(model, **llm_options)
    if client.tokenizer is None or not client.tokenizer.chat_template:
        console.print("[red]this model has no tokenizer / chat template[/red]")
        client.shutdown()
        return 2
    session = ChatSession(client, console, SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                                          top_p=top_p), system,
                          tools=DEMO_TOOLS if tools else None, max_tool_rounds=max_tool_rounds)  # fmt: skip
    session.enable_thinking, session.budget = thinking, budget
    if messages is None:
        console.print(f"[bold]nemotron3 chat[/bold] — {model}. {HELP}")
    scripted = iter(messages) if messages is not None else None
    try:
        while True:
            try:
                if scripted is None:
                    line = console.input("[bold green]> [/bold green]").strip()
                else:
                    line = next(scripted).strip()
                    console.print(f"[bold green]> [/bold green]{_escape(line)}", highlight=False)
            except (EOFError, KeyboardInterrupt, StopIteration):
                break
            if not line:
                continue
            if line.startswith("/"):
                try:
                    if not session.command(line):
                        break
                except ValueError as e:
                    console.print(f"[red]{e}[/red]")
                continue
            try:
                asyncio.run(session.turn(line))
            except KeyboardInterrupt:
                console.print("\n[dim](interrupted)[/dim]")
            except ValueError as e:
                console.print(f"[red]{e}[/red]")
    finally:
        client.shutdown()
    return 0


def _template_call(call: dict) -> dict:
    """An OpenAI tool call (JSON-text arguments) as the chat template wants it (arguments as a mapping)."""
    fn = call["function"]
    try:
        args = json.loads(fn["arguments"]) if isinstance(fn["arguments"], str) else fn["arguments"]
    except ValueError:
        args = {}
    if not isinstance(args, dict):
        args = {}
    return {"id": call["id"], "type": "function", "function": {"name": fn["name"], "arguments": args}}


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
