"""`nemotron3 serve --speculative-config ...`: the server on the MTP speculative engine gives the same greedy
text as the plain engine (speculation is lossless), and a malformed config is a usage error."""

from __future__ import annotations

import openai

from nemotron3.cli import main
from nemotron3.serve.api import ServeConfig, ServerThread, build_client, create_app

PROMPTS = ["ROMEO:\n", "KING HENRY.\nNow, lords,"]


def _greedy_texts(**llm_options) -> list[str]:
    client = build_client("default", max_model_len=512, max_num_seqs=8, **llm_options)
    try:
        with ServerThread(create_app(client, ServeConfig(model_names=["default"]))) as url:
            oc = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
            return [oc.completions.create(model="default", prompt=p, max_tokens=24, temperature=0).choices[0].text
                    for p in PROMPTS]  # fmt: skip
    finally:
        client.shutdown()


def test_speculative_server_matches_plain_greedy() -> None:
    plain = _greedy_texts()
    spec = _greedy_texts(speculative_config={"method": "mtp", "num_speculative_tokens": 3})
    assert spec == plain and all(plain)


def test_bad_speculative_config_is_a_usage_error(capsys) -> None:
    assert main(["serve", "--speculative-config", "{not json"]) == 2
    assert "--speculative-config" in capsys.readouterr().err
    assert main(["serve", "--speculative-config", '{"method": "eagle", "num_speculative_tokens": 2}']) == 2
    assert "eagle" in capsys.readouterr().err
