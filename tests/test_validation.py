"""Issue 14, validation half: every bad value is a one-line error (exit 2) before any work starts.

Through the real CLI in this process (`test_cli.run`) or a real server on 127.0.0.1; the property test
feeds every ranged option of every method an out-of-range value, in-process (no CLI start per field).
"""

from __future__ import annotations

import dataclasses
import json
import math
import socket
import typing

import httpx
import pytest
from test_cli import assert_user_error, run
from test_serve_engine import make_delta
from test_serve_http import InProcessServer

from deltatune.config import TrainConfig
from deltatune.data import TaskArgs
from deltatune.data.templates import PromptArgs
from deltatune.errors import UserError
from deltatune.methods import REGISTRY, resolve_method
from deltatune.options import Range, describe, range_of, validate
from deltatune.serve.app import Limits
from deltatune.serve.cli import Batching

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (conftest.py)
TOKEN = "validation-token"


# ---- the property: every ranged field of every method refuses an out-of-range value --------------------

def bad_values(bounds: Range, is_int: bool) -> list:
    """Values just outside a declared range (and nan for a float), as `--set` would pass them."""
    if bounds.choices is not None:
        return ["not-a-choice"]
    step = 1 if is_int else 0.5
    values = [bounds.ge - step if bounds.ge is not None else None, bounds.gt if bounds.gt is not None else None,
              bounds.le + step if bounds.le is not None else None, bounds.lt if bounds.lt is not None else None]
    return [v for v in values if v is not None] + ([] if is_int else [math.nan, math.inf])


def good_value(bounds: Range, is_int: bool):
    """A value inside a declared range."""
    if bounds.choices is not None:
        return bounds.choices[-1]
    low = bounds.ge if bounds.ge is not None else (bounds.gt + (1 if is_int else 0.5) if bounds.gt is not None else None)
    high = bounds.le if bounds.le is not None else (bounds.lt - (1 if is_int else 0.5) if bounds.lt is not None else None)
    value = low if low is not None else high
    return int(value) if is_int else float(value)


def element_type(hint) -> type | None:
    """int / float / str of a field's type, looking inside `| None` and `tuple[T, ...]`."""
    for arg in (hint, *typing.get_args(hint)):
        if arg in (int, float, str, bool):
            return arg
        if typing.get_origin(arg) is tuple:
            return typing.get_args(arg)[0]
    return None


def test_every_method_option_refuses_out_of_range_values():
    ranged = numeric = checked = 0
    for name, method in REGISTRY.items():
        hints = typing.get_type_hints(method.Config)
        for field in dataclasses.fields(method.Config):
            kind = element_type(hints[field.name])
            numeric += kind in (int, float)
            bounds = range_of(field)
            if bounds is None:
                continue
            ranged += kind in (int, float)
            is_tuple = any(typing.get_origin(a) is tuple for a in (hints[field.name], *typing.get_args(hints[field.name])))
            for bad in bad_values(bounds, kind is int):
                raw = str(bad if not isinstance(bad, float) or not bad.is_integer() else int(bad))
                for value in (raw, (bad,) if is_tuple else bad):  # as `--set` passes it, and typed (a file)
                    with pytest.raises(UserError) as info:
                        resolve_method(name, {field.name: value})
                    message = str(info.value)
                    assert "\n" not in message and f"option '{field.name}'" in message, (name, field.name, message)
                    assert describe(field)[1:-1] in message, message  # the range is named
                    checked += 1
            resolve_method(name, {field.name: getattr(method.Config(), field.name)})  # the default is valid
            good = good_value(bounds, kind is int)  # and a valid value as `--set` writes it (`layers=1,0`)
            typed = resolve_method(name, {field.name: f"{good},{good}" if is_tuple else str(good)})[1]
            assert getattr(typed, field.name) == ((good, good) if is_tuple else good), (name, field.name)
            if kind is int:  # a config file's 2.5 for an int option is refused, not truncated
                with pytest.raises(UserError, match=f"option '{field.name}' must be an integer"):
                    resolve_method(name, {field.name: (good + 0.5,) if is_tuple else good + 0.5})
    assert ranged >= 0.9 * numeric, f"{ranged} of {numeric} numeric method options declare a range"
    assert checked > 100


@pytest.mark.parametrize("cls", [TrainConfig, TaskArgs, PromptArgs, Batching, Limits])
def test_every_cli_dataclass_field_is_checked(cls):
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    numeric = [f for f in fields if element_type(hints[f.name]) in (int, float)]
    assert all(range_of(f) is not None for f in numeric), [f.name for f in numeric if range_of(f) is None]
    for field in fields:
        bounds = range_of(field)
        for bad in bad_values(bounds, element_type(hints[field.name]) is int) if bounds else []:
            with pytest.raises(UserError, match=f"option '{field.name}' must"):
                validate(dataclasses.replace(cls(), **{field.name: bad}))


def test_method_option_listing_shows_ranges():
    proc = run("train", "--method", "lora", "--data", "nowhere.csv", "--out", "x", "--set", "rank=4")
    assert_user_error(proc, "unknown option 'rank'", "r (>= 1)", "dropout (0 <= x < 1)")
    help_text = run("train", "--help").stdout
    lr_help = help_text.split("\n  --lr LR", 1)[1].split("\n  --", 1)[0]
    assert "(> 0)" in lr_help, lr_help


# ---- the CLI examples of the issue -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tiny_dir, toy_csv, tmp_path_factory):
    root = tmp_path_factory.mktemp("validation")
    model = tiny_dir("bert")
    return {"root": root, "model": model, "csv": toy_csv, "lora": make_delta(root / "lora", model, "lora")}


@pytest.mark.parametrize("args, fragment", [
    (["--set", "r=-1"], "option 'r' must be >= 1, got -1"),
    (["--set", "r=0"], "option 'r' must be >= 1, got 0"),
    (["--set", "dropout=2"], "option 'dropout' must be 0 <= x < 1, got 2"),
    (["--set", "alpha=nan"], "option 'alpha' must be a finite number"),
    (["--lr", "-1"], "--lr must be > 0, got -1"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
])
def test_bad_training_values_are_one_line_errors(files, args, fragment):
    out = files["root"] / "never"
    proc = run("train", "--method", "lora", "--model", files["model"], "--data", files["csv"], "--out", str(out), *args)
    assert_user_error(proc, fragment)
    assert "train /" not in proc.stderr  # refused before the data loaded
    assert not out.exists()


def test_predict_batch_size_zero(files):
    assert_user_error(run("predict", str(files["lora"]), "a film", "--batch-size", "0"), "--batch-size must be >= 1")


def test_nonfinite_loss_stops_training_and_writes_no_delta(files):
    out = files["root"] / "diverged"
    proc = run("train", "--method", "lora", "--model", files["model"], "--data", files["csv"], "--out", str(out),
               "--lr", "1e30", "--epochs", "1", "--batch-size", "8", "--train-size", "32", "--no-progress")
    assert_user_error(proc, "training lora stopped", "optimizer step", "Lower the learning rate (--lr)")
    assert not (out / "delta.safetensors").exists()


def test_compare_checks_every_method_before_training(files):
    out = files["root"] / "compare"
    proc = run("compare", "--methods", "features,lora", "--set", "lora.r=abc", "--model", files["model"],
               "--data", files["csv"], "--out", str(out))
    assert_user_error(proc, "lora: option 'r' expects int, got 'abc'")
    assert "== features ==" not in proc.stderr and not out.exists()  # nothing trained, nothing written


def test_options_and_positionals_mix(files):
    proc = run("predict", str(files["lora"]), "--json", "a good film", "--batch-size", "2", "an awful film")
    assert proc.returncode == 0, proc.stderr
    assert [r["text"] for r in json.loads(proc.stdout)] == ["a good film", "an awful film"]


def test_serve_on_a_busy_port_is_one_line_before_the_banner(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run("serve", "--registry", str(tmp_path / "registry"), "--port", str(port))
    assert_user_error(proc, f"cannot listen on 127.0.0.1:{port}")
    assert "deltatune serve:" not in proc.stderr  # no banner


def test_config_file_accepts_set(files, tmp_path):
    listed, mapping = tmp_path / "listed.yaml", tmp_path / "mapping.yaml"
    listed.write_text("set:\n  - alpha=4\n  - r=0\n")
    mapping.write_text("set: {r: -3}\n")
    for config, got in ((listed, "got 0"), (mapping, "got -3")):
        proc = run("train", "--config", str(config), "--method", "lora", "--model", files["model"],
                   "--data", files["csv"], "--out", str(tmp_path / "out"))
        assert_user_error(proc, "option 'r' must be >= 1", got)  # the file's `set` reached the method


def test_eval_shows_a_progress_bar(files):
    proc = run("eval", str(files["lora"]), "--data", files["csv"])
    assert proc.returncode == 0, proc.stderr
    assert "evaluating" in proc.stderr and "batch" in proc.stderr
    quiet = run("eval", str(files["lora"]), "--data", files["csv"], "--no-progress")
    assert "evaluating" not in quiet.stderr
    assert quiet.stdout.rsplit(",", 1)[0] == proc.stdout.rsplit(",", 1)[0]  # the same accuracy (timing aside)


def test_predict_refuses_an_empty_text(files):
    assert_user_error(run("predict", str(files["lora"]), "good", "  "), "text 2 is empty")


def test_one_utf8_rule_for_predict_file_and_train_data(files, tmp_path):
    texts, data = tmp_path / "texts.txt", tmp_path / "data.csv"
    texts.write_bytes(b"a good film\ncaf\xe9 au lait\n")  # Latin-1, not UTF-8
    data.write_bytes(b"text,label\na good film,pos\ncaf\xe9 au lait,neg\n")
    assert_user_error(run("predict", str(files["lora"]), "--file", str(texts)), f"{texts}: line 2 is not valid UTF-8")
    proc = run("train", "--method", "lora", "--model", files["model"], "--data", str(data), "--out", str(tmp_path / "o"))
    assert_user_error(proc, f"{data}: line 3 is not valid UTF-8")


def test_one_column_as_text_and_label(files, tmp_path):
    proc = run("train", "--method", "lora", "--model", files["model"], "--data", files["csv"], "--label-column",
               "text", "--out", str(tmp_path / "o"))
    assert_user_error(proc, "--text-column and --label-column both name column 'text'")


# ---- a real server on 127.0.0.1 ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(files):
    from deltatune.serve.engine import Engine

    knn = files["root"] / "knn"
    proc = run("train", "--method", "knn", "--model", files["model"], "--data", files["csv"], "--out", str(knn),
               "--no-progress")
    assert proc.returncode == 0, proc.stderr
    served = InProcessServer(Engine(files["model"], device="cpu"), files["root"] / "registry", admin_token=TOKEN)
    client = httpx.Client(base_url=served.url, timeout=30, headers={"Authorization": f"Bearer {TOKEN}"})
    assert client.put("/v1/tasks/sentiment", json={"path": str(files["lora"])}).status_code == 200
    yield client, knn
    client.close()
    served.stop()


def test_server_refuses_an_empty_text(server):
    client, _ = server
    for path, body in (("/v1/predict", {"items": [{"task": "sentiment", "text": "good"},
                                                   {"task": "sentiment", "text": ""}]}),
                       ("/v1/tasks/sentiment/predict", {"text": "   "})):
        response = client.post(path, json=body)
        assert response.status_code == 422, response.text
        assert "is empty" in response.json()["detail"]
    assert client.post("/v1/tasks/sentiment/predict", json={"text": "good"}).status_code == 200


def test_knn_delta_is_refused_with_the_reason(server):
    client, knn = server
    response = client.put("/v1/tasks/neighbours", json={"path": str(knn)})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "knn" in detail and "cannot be served" in detail and "deltatune predict" in detail
    assert "delta.safetensors" not in detail
    assert "neighbours" not in [t["name"] for t in client.get("/v1/tasks").json()["tasks"]]


def test_docs_page_says_it_needs_the_network(server):
    client, _ = server
    page = client.get("/docs")
    assert page.status_code == 200
    assert "without network access it stays blank" in page.text and 'href="/openapi.json"' in page.text
    assert client.get("/openapi.json").status_code == 200

