"""`nemotron3 chat MODEL`: an interactive terminal chat; reasoning is shown dimmed, tokens stream.

Commands: /think on|off, /budget N|off, /effort none|minimal|low|medium|high, /reset, /exit (or Ctrl-D).
The engine runs in-process (AsyncLLM + the same reasoning-budget driver the server uses).
"""

from __future__ import annotations

import asyncio
import dataclasses

from rich.console import Console

from nemotron3.engine.reasoning import ReasoningConfig, ThinkTokens, prompt_opens_thinking, stream_with_budget
from nemotron3.engine.sampling_params import SamplingParams
from nemotron3.serve.parsers import ReasoningStreamParser

HELP = "commands: /think on|off  /budget N|off  /effort LEVEL  /reset  /exit"


class ChatSession:
    """Conversation state + settings; `turn(text)` streams one assistant reply to the console."""

    def __init__(self, client, console: Console, params: SamplingParams, system: str | None = None) -> None:
        self.client, self.console, self.params = client, console, params
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
        else:
            self.console.print(f"[yellow]{HELP}[/yellow]")
        return True

    async def turn(self, text: str) -> str:
        self.messages.append({"role": "user", "content": text})
        config = ReasoningConfig.resolve(self.enable_thinking, self.effort, self.budget)
        prompt = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True,
                                                    enable_thinking=config.enabled)  # fmt: skip
        prompt_ids = self.tokenizer.encode(prompt)
        room = self.client.max_model_len - len(prompt_ids)
        if room < 1:
            self.messages.pop()
            raise ValueError("the conversation fills the context: /reset")
        params = dataclasses.replace(self.params, max_tokens=min(self.params.max_tokens or room, room))
        in_reasoning = config.enabled and prompt_opens_thinking(prompt)
        parser = ReasoningStreamParser(in_reasoning)
        reasoning, content = [], []
        self._turns += 1
        async for piece in stream_with_budget(self.client, prompt_ids, params, config, self.think, self.tokenizer,
                                              in_reasoning=in_reasoning, request_id=f"chat-{self._turns}"):  # fmt: skip
            r, c = parser.feed(piece.text)
            self._show(r, c, reasoning, content)
        r, c = parser.finish()
        self._show(r, c, reasoning, content)
        self.console.print()
        answer = "".join(content).strip()
        msg = {"role": "assistant", "content": answer}
        if reasoning:
            msg["reasoning_content"] = "".join(reasoning).strip()
        self.messages.append(msg)
        return answer

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
             top_p: float = 0.95, thinking: bool = True, budget: int | None = None, **llm_options) -> int:  # fmt: skip
    from nemotron3.serve.api import build_client

    console = Console()
    with console.status(f"loading {model}"):
        client = build_client(model, **llm_options)
    if client.tokenizer is None or not client.tokenizer.chat_template:
        console.print("[red]this model has no tokenizer / chat template[/red]")
        client.shutdown()
        return 2
    session = ChatSession(client, console, SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                                          top_p=top_p), system)  # fmt: skip
    session.enable_thinking, session.budget = thinking, budget
    console.print(f"[bold]nemotron3 chat[/bold] — {model}. {HELP}")
    try:
        while True:
            try:
                line = console.input("[bold green]> [/bold green]").strip()
            except (EOFError, KeyboardInterrupt):
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
