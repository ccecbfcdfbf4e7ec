"""`orthrus generate`: output streams, the --json object, flags, and one-line errors for bad arguments."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import orthrus.cli
from checkpoints import write_checkpoint

REPO = Path(__file__).resolve().parent.parent
PROMPT = "hello world, the quick brown fox"
STATS_KEYS = {"iterations", "tokens_per_iteration", "tokens_per_second", "prefill_seconds", "decode_seconds",
              "accepted_histogram"}
STATS_LINE = re.compile(r"\[(orthrus|ar|ngram)\] (\d+) tokens, (\d+) iterations, [\d.]+ tokens/iteration, "
                        r"[\d.]+ tok/s, prefill [\d.]+ ms, decode [\d.]+ ms")


def run_main(argv) -> int:
    """orthrus.cli.main as the console script runs it: argument errors end in SystemExit."""
    try:
        return orthrus.cli.main(argv)
    except SystemExit as exit:
        return exit.code


def run_cli(*args, env=None):
    """`python -m orthrus ...` on this checkout (not an installed copy); output as bytes decoded as UTF-8, so
    that control characters a random model emits arrive unchanged."""
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                       PYTHONIOENCODING="utf-8", **(env or {}))
    environment.pop("ORTHRUS_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "orthrus", *map(str, args)], cwd=REPO, env=environment,
                          capture_output=True, timeout=120)
    return done.returncode, done.stdout.decode("utf-8"), done.stderr.decode("utf-8")


def generate_args(model_dir, *extra):
    return ["generate", PROMPT, "--model", str(model_dir), "--device", "cpu", "--max-new-tokens", "12", *extra]


def assert_one_line_error(code, out, err, *fragments):
    assert code not in (0, None), (code, out, err)
    assert "Traceback" not in err and "Traceback" not in out
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith("orthrus: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module")
def plain_no_tokenizer_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("plain_no_tokenizer"), orthrus=False)


@pytest.fixture
def corrupt_config_dir(tmp_path, tiny_orthrus_dir):
    directory = tmp_path / "corrupt"
    directory.mkdir()
    for file in tiny_orthrus_dir.iterdir():
        if file.name != "config.json":
            (directory / file.name).symlink_to(file)
    (directory / "config.json").write_text('{"vocab_size": 384, "hidden_size":')
    return directory


# --------------------------------------------------------------------------------------------------------
# subprocess: the real entry point

def test_subprocess_streams_text_and_prints_stats(tiny_orthrus, tiny_orthrus_dir):
    expected = tiny_orthrus.generate(PROMPT, max_new_tokens=12)
    code, out, err = run_cli(*generate_args(tiny_orthrus_dir))
    assert code == 0, err
    assert out == expected.text + "\n"
    lines = err.splitlines()
    assert len(lines) == 1, err
    match = STATS_LINE.fullmatch(lines[0])
    assert match, lines[0]
    assert match.group(1) == "orthrus" and int(match.group(2)) == len(expected.tokens)
    assert int(match.group(3)) == expected.stats["iterations"]


def test_subprocess_json(tiny_orthrus, tiny_orthrus_dir):
    expected = tiny_orthrus.generate(PROMPT, max_new_tokens=12)
    code, out, err = run_cli(*generate_args(tiny_orthrus_dir, "--json"))
    assert code == 0, err
    assert err == ""
    assert out.endswith("\n") and out.count("\n") == 1
    result = json.loads(out)
    assert set(result) == {"text", "tokens", "stats"}
    assert result["tokens"] == expected.tokens and result["text"] == expected.text
    assert STATS_KEYS <= set(result["stats"])


@pytest.mark.parametrize("args, fragments", [
    (["generate", "hi", "--model", "/nonexistent/orthrus-model"], ["/nonexistent/orthrus-model"]),
    (["generate", "hi", "--mode", "foo"], ["--mode", "'foo'"]),
    (["generate", "hi", "--top-p", "2", "--max-new-tokens", "4"], ["top_p", "2.0"]),
])
def test_subprocess_bad_arguments(tiny_orthrus_dir, args, fragments):
    if "--model" not in args:
        args = args + ["--model", str(tiny_orthrus_dir), "--device", "cpu"]
    assert_one_line_error(*run_cli(*args), *fragments)


def test_subprocess_corrupt_config(corrupt_config_dir):
    code, out, err = run_cli("generate", "hi", "--model", corrupt_config_dir, "--device", "cpu")
    assert_one_line_error(code, out, err, str(corrupt_config_dir / "config.json"), "not valid JSON")


def test_subprocess_unreachable_hub_id(tmp_path):
    pytest.importorskip("huggingface_hub")
    code, out, err = run_cli("generate", "hi", "--model", "nonexistent-org/nonexistent-model",
                             env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert_one_line_error(code, out, err, "nonexistent-org/nonexistent-model", "pass a local checkpoint directory")


# --------------------------------------------------------------------------------------------------------
# in-process: orthrus.cli.main

def test_main_streams_to_stdout(tiny_orthrus, tiny_orthrus_dir, capsys, monkeypatch):
    expected = tiny_orthrus.generate(PROMPT, max_new_tokens=12)
    pieces = []
    real_write = sys.stdout.write
    monkeypatch.setattr(sys.stdout, "write", lambda text: pieces.append(text) or real_write(text))
    assert run_main(generate_args(tiny_orthrus_dir)) == 0
    out, err = capsys.readouterr()
    assert out == expected.text + "\n"
    # Streamed as it was generated, not printed once at the end.
    assert len([p for p in pieces if p]) > 2 and "".join(pieces) == out
    assert STATS_LINE.fullmatch(err.rstrip("\n")) and err.count("\n") == 1


def test_main_json(tiny_orthrus_dir, capsys):
    assert run_main(generate_args(tiny_orthrus_dir, "--json")) == 0
    out, err = capsys.readouterr()
    assert err == ""
    result = json.loads(out)
    stats = result["stats"]
    assert STATS_KEYS <= set(stats)
    assert stats["iterations"] >= 1 and stats["tokens_per_iteration"] >= 1.0
    assert stats["tokens_per_second"] > 0 and stats["prefill_seconds"] > 0 and stats["decode_seconds"] > 0
    histogram = {int(k): v for k, v in stats["accepted_histogram"].items()}
    assert sum(histogram.values()) == stats["iterations"]
    # The prefill gives the first token; every iteration at least one more (the last may overshoot the cap).
    assert sum(k * n for k, n in histogram.items()) >= len(result["tokens"]) - 1


def json_generate(capsys, argv) -> dict:
    assert run_main(argv) == 0
    out, err = capsys.readouterr()
    assert err == ""
    return json.loads(out)


def test_ar_and_orthrus_modes_give_the_same_tokens(tiny_orthrus_dir, capsys):
    ar = json_generate(capsys, generate_args(tiny_orthrus_dir, "--json", "--mode", "ar", "--max-new-tokens", "24"))
    fast = json_generate(capsys, generate_args(tiny_orthrus_dir, "--json", "--mode", "orthrus",
                                               "--max-new-tokens", "24"))
    assert ar["tokens"] == fast["tokens"] and ar["text"] == fast["text"]
    assert ar["stats"]["mode"] == "ar" and fast["stats"]["mode"] == "orthrus"
    assert ar["stats"]["iterations"] == len(ar["tokens"]) - 1
    assert fast["stats"]["iterations"] < ar["stats"]["iterations"]


def test_chat(tiny_orthrus, tiny_orthrus_dir, capsys):
    expected = tiny_orthrus.generate([{"role": "user", "content": PROMPT}], max_new_tokens=12)
    plain = tiny_orthrus.generate(PROMPT, max_new_tokens=12)
    result = json_generate(capsys, generate_args(tiny_orthrus_dir, "--json", "--chat"))
    assert result["tokens"] == expected.tokens
    assert result["stats"]["prompt_tokens"] > plain.stats["prompt_tokens"]  # the template wrapped the prompt


def test_sampling_flags(tiny_orthrus, tiny_orthrus_dir, capsys):
    flags = ["--json", "--temperature", "0.9", "--top-k", "50", "--top-p", "0.95"]
    expected = tiny_orthrus.generate(PROMPT, max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.95, seed=7)
    first = json_generate(capsys, generate_args(tiny_orthrus_dir, *flags, "--seed", "7"))
    again = json_generate(capsys, generate_args(tiny_orthrus_dir, *flags, "--seed", "7", "--mode", "ar"))
    other = json_generate(capsys, generate_args(tiny_orthrus_dir, *flags, "--seed", "8"))
    greedy = json_generate(capsys, generate_args(tiny_orthrus_dir, "--json"))
    assert first["tokens"] == expected.tokens == again["tokens"]
    assert first["stats"]["seed"] == 7
    assert other["tokens"] != first["tokens"] and greedy["tokens"] != first["tokens"]


def test_stop_string(tiny_orthrus, tiny_orthrus_dir, capsys):
    full = tiny_orthrus.generate(PROMPT, max_new_tokens=12).text
    stop = full[3:5]
    assert stop and stop in full
    result = json_generate(capsys, generate_args(tiny_orthrus_dir, "--json", "--stop", stop))
    assert result["text"] == full[:full.index(stop)]


def test_token_id_prompt_without_tokenizer(plain_no_tokenizer_dir, capsys):
    import orthrus

    expected = orthrus.load(plain_no_tokenizer_dir, device="cpu").generate([3, 1, 4, 1, 5], max_new_tokens=6,
                                                                           mode="ar")
    argv = ["generate", "3 1,4 1 5", "--ids", "--model", str(plain_no_tokenizer_dir), "--device", "cpu",
            "--mode", "ar", "--max-new-tokens", "6"]
    assert run_main(argv) == 0
    out, err = capsys.readouterr()
    assert out == " ".join(map(str, expected.tokens)) + "\n"
    assert STATS_LINE.fullmatch(err.rstrip("\n"))


@pytest.mark.parametrize("extra, fragments", [
    (["--top-p", "2"], ["top_p must be in (0, 1]", "2.0"]),
    (["--top-p", "0"], ["top_p"]),
    (["--max-new-tokens", "0"], ["max_new_tokens must be an integer >= 1", "got 0"]),
    (["--max-new-tokens", "ten"], ["--max-new-tokens", "'ten'"]),
    (["--mode", "foo"], ["--mode", "invalid choice: 'foo'"]),
    (["--temperature", "-1"], ["temperature must be a number >= 0"]),
    (["--top-k", "-2"], ["top_k must be an integer >= 0"]),
    (["--seed", "-5", "--temperature", "1"], ["seed must be an integer >= 0"]),
    (["--dtype", "int8"], ["--dtype", "choose from float32, float16, bfloat16"]),
    (["--device", "toaster"], ["device 'toaster' is not a valid torch device"]),
    (["--max-new-tokens", "2000"], ["max_position_embeddings (1024)"]),
    (["--chat", "--ids"], ["--ids", "--chat"]),
    (["--ids"], ["prompt: with --ids it must be token ids"]),
    (["--unknown-flag"], ["unrecognized arguments: --unknown-flag"]),
])
def test_main_bad_arguments(tiny_orthrus_dir, capsys, extra, fragments):
    code = run_main(["generate", PROMPT, "--model", str(tiny_orthrus_dir), "--device", "cpu", *extra])
    out, err = capsys.readouterr()
    assert_one_line_error(code, out, err, *fragments)


def test_main_nonexistent_model_dir(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    code = run_main(["generate", "hi", "--model", str(missing)])
    assert_one_line_error(code, *capsys.readouterr(), str(missing), "no such checkpoint directory")


def test_main_corrupt_config(corrupt_config_dir, capsys):
    code = run_main(["generate", "hi", "--model", str(corrupt_config_dir), "--device", "cpu"])
    assert_one_line_error(code, *capsys.readouterr(), str(corrupt_config_dir / "config.json"), "not valid JSON")


def test_main_plain_qwen3_needs_ar_mode(plain_no_tokenizer_dir, capsys):
    code = run_main(["generate", "1 2 3", "--ids", "--model", str(plain_no_tokenizer_dir), "--device", "cpu"])
    assert_one_line_error(code, *capsys.readouterr(), "plain Qwen3 checkpoint", "`orthrus train`")


@pytest.mark.parametrize("extra, fragments", [
    ([], ["has no tokenizer.json", "--ids"]),
    (["--chat"], ["--chat needs a tokenizer"]),
])
def test_main_text_prompt_without_tokenizer(plain_no_tokenizer_dir, capsys, extra, fragments):
    code = run_main(["generate", "hello", "--model", str(plain_no_tokenizer_dir), "--device", "cpu",
                     "--mode", "ar", *extra])
    assert_one_line_error(code, *capsys.readouterr(), *fragments)


def test_main_without_a_command(capsys):
    assert_one_line_error(run_main([]), *capsys.readouterr(), "required: command")


def test_main_unexpected_exception_is_one_line(tiny_orthrus_dir, capsys, monkeypatch):
    def broken_load(*args, **kwargs):
        raise RuntimeError("first line\n  second line")

    monkeypatch.delenv("ORTHRUS_DEBUG", raising=False)
    monkeypatch.setattr("orthrus.loader.load", broken_load)
    code = run_main(generate_args(tiny_orthrus_dir))
    assert_one_line_error(code, *capsys.readouterr(), "RuntimeError: first line second line")
