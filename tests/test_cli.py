"""`nemotron3 info`: presets, config directories, JSON output, error exits."""

import json
import os
import subprocess
import sys
from pathlib import Path

from nemotron3.cli import main
from nemotron3.config import PRESETS, preset


def run_json(capsys, *args: str) -> dict:
    assert main(["info", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_info_json_tiny(capsys):
    out = run_json(capsys, "tiny")
    assert out["model"] == "tiny"
    assert out["total_params"] == 172_672 and out["pattern"] == "MEM*E-"
    assert out["mtp_params"] > 0 and out["mtp_pattern"] == "*E"
    assert out["active_params"] - out["active_params_excl_embedding"] == 256 * 64
    assert [w["format"] for w in out["weight_memory"]] == ["bf16", "fp8", "nvfp4"]
    assert [c["tokens"] for c in out["contexts"]] == [8192, 131072, 2**20]


def test_info_table(capsys):
    assert main(["info", "tiny"]) == 0
    out = capsys.readouterr().out
    for text in ("tiny", "pattern MEM*E-", "172,672", "nvfp4", "4.5 bits/element", "1M", "Mamba state"):
        assert text in out, text


def test_info_preset_prefix(capsys):
    out = run_json(capsys, "nano")
    assert out["model"] == "nano-30b-a3b" and out["total_params"] == 31_577_940_288
    assert out["contexts"][-1]["kv_bytes"] == 6 * 2**30


def test_info_directory_reads_config_json(tmp_path, capsys):
    preset("super-120b-a12b").to_json(tmp_path)
    out = run_json(capsys, str(tmp_path))
    assert out["model"] == str(tmp_path)
    assert out["total_params"] == 120_668_707_840 and out["mtp_params"] == 2_942_325_248
    custom = preset("tiny").replace(vocab_size=512)
    custom.to_json(tmp_path)
    assert run_json(capsys, str(tmp_path / "config.json"))["embedding_params"] == 512 * 64


def test_unknown_model_exits_2_listing_presets(capsys):
    assert main(["info", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'no-such-model'" in err
    assert all(name in err for name in PRESETS)


def test_ambiguous_prefix_exits_2(capsys, monkeypatch):
    monkeypatch.setitem(PRESETS, "nano-lightning", PRESETS["nano-30b-a3b"])
    assert main(["info", "nano"]) == 2
    assert "ambiguous" in capsys.readouterr().err


def test_bad_directory_exits_2(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{not json")
    assert main(["info", str(tmp_path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["info", str(tmp_path)]) == 2
    assert "model_type" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys):
    assert main([]) == 2
    assert main(["info", "no-such-model"]) == 2
    assert main(["info"]) == 0  # no model named: the embedded default model
    assert main(["--help"]) == 0


def test_python_dash_m():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "nemotron3", "info", "tiny", "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["total_params"] == 172_672


def test_prefix_caching_flag_defaults():
    """serve and chat cache prefixes unless told not to (or speculating, which the engine refuses); generate does
    not unless told to."""
    from nemotron3.cli import _llm_options, build_parser

    parser = build_parser()
    serve = lambda *extra: _llm_options(parser.parse_args(["serve", "default", *extra]))
    assert serve()["enable_prefix_caching"] is True
    assert serve("--no-enable-prefix-caching")["enable_prefix_caching"] is False
    assert serve("--speculative-config", '{"method": "mtp"}')["enable_prefix_caching"] is False
    assert _llm_options(parser.parse_args(["chat", "default"]))["enable_prefix_caching"] is True
    generate = ["generate", "default", "--prompt", "hi"]
    assert parser.parse_args(generate).enable_prefix_caching is False
    assert parser.parse_args([*generate, "--enable-prefix-caching"]).enable_prefix_caching is True
