"""User mistakes end in one `error: ...` line and exit status 2; --debug shows the traceback.

The cheap mistakes run each entry point as a subprocess (all started at once, so the torch
imports overlap); the ones that need data, models or checkpoints call `run_cli(main, argv)`
in-process on the tiny synthetic workspace.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import inference
import train_itm
from tests.helpers import itm_config, put_raw, write_config
from utils.errors import DEBUG_ENV, DataError, UserError, run_cli

REPO = Path(__file__).resolve().parents[1]

def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != DEBUG_ENV}
    return {**env, **extra}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess]:
    """Every subprocess case, started together and waited for together (one per entry point)."""
    tmp = tmp_path_factory.mktemp("user_errors")
    typo = tmp / "typo.yaml"
    typo.write_text("train:\n  lerning_rate: 0.1\n")
    ok = tmp / "ok.yaml"
    ok.write_text("train:\n  learning_rate: 0.1\n")
    missing = tmp / "no_such_config.yaml"
    cases = {
        "missing_config": (["train_itm.py", "--config", str(missing)], _env()),
        "unknown_key": (["inference.py", "--config", str(typo), "--checkpoint", str(tmp / "c.pt"),
                         "--output_dir", str(tmp / "o1")], _env()),
        "bad_value": (["pretrain.py", "--config", str(ok), "--output_dir", str(tmp / "o2"),
                       "train.precision=fp17"], _env()),
        "missing_data": (["rerank.py", "--config", str(ok), "--retrieval_dir", str(tmp / "r"),
                          "--output_dir", str(tmp / "o3"), f"data.test_txt_db={tmp / 'no_txt_db'}"], _env()),
        "report_missing": (["scripts/report.py", str(tmp / "no_results")], _env()),
        "report_missing_debug": (["scripts/report.py", str(tmp / "no_results"), "--debug"], _env()),
        "report_missing_env_debug": (["scripts/report.py", str(tmp / "no_results")], _env(**{DEBUG_ENV: "1"})),
    }
    procs = {
        name: subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for name, (argv, env) in cases.items()
    }
    runs = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        runs[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return runs


def _assert_user_error(run: subprocess.CompletedProcess, *named: str) -> str:
    assert run.returncode == 2, (run.returncode, run.stderr)
    assert "Traceback" not in run.stderr, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, run.stderr
    for text in named:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def test_missing_config_file(cli_runs):
    _assert_user_error(cli_runs["missing_config"], "config file not found", "no_such_config.yaml")


def test_unknown_config_key_suggests_the_right_one(cli_runs):
    _assert_user_error(cli_runs["unknown_key"], "typo.yaml", "'lerning_rate'", "did you mean 'learning_rate'")


def test_bad_command_line_value(cli_runs):
    _assert_user_error(cli_runs["bad_value"], "precision", "'fp17'", "did you mean 'fp16'")


def test_config_data_path_that_does_not_exist(cli_runs):
    _assert_user_error(cli_runs["missing_data"], "'data.test_txt_db'", "no_txt_db", "does not exist")


@pytest.mark.parametrize("case", ["report_missing_debug", "report_missing_env_debug"])
def test_debug_shows_the_traceback(cli_runs, case):
    _assert_user_error(cli_runs["report_missing"], "no_results", "does not exist")
    run = cli_runs[case]
    assert run.returncode == 1, run.stderr
    assert "Traceback" in run.stderr and "MissingPathError: results path" in run.stderr


def test_argparse_usage_errors_keep_their_exit_status(capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli(train_itm.main, [])
    assert exc.value.code == 2
    assert "--config" in capsys.readouterr().err


# ---------------------------------------------------------------- the runner itself


def test_programming_errors_keep_their_traceback(capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)

    def broken(argv):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        run_cli(broken, [])
    assert capsys.readouterr().err == ""


def test_runner_strips_debug_and_passes_exit_codes(capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    seen = []

    def main(argv):
        seen.append(argv)
        if "--fail" in argv:
            raise DataError("image 'x' is not in img_db /data/img")
        return 3 if "--three" in argv else {"result": 1}

    assert run_cli(main, ["--three", "--debug"]) == 3
    assert run_cli(main, ["a"]) == 0
    assert seen == [["--three"], ["a"]]
    assert run_cli(main, ["--fail"]) == 2
    assert capsys.readouterr().err == "error: image 'x' is not in img_db /data/img\n"
    with pytest.raises(UserError):
        run_cli(main, ["--fail", "--debug"])
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(DataError):
        run_cli(main, ["--fail"])


# ---------------------------------------------------------------- mistakes that need data


def _in_process(capsys, main, argv) -> str:
    assert run_cli(main, [str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return err


def _infer_args(ws, out: Path, *extra: str, checkpoint: Path | None = None) -> list:
    return ["--config", ws.config, "--checkpoint", checkpoint or ws.our_ckpt, "--output_dir", out, *extra]


def test_checkpoint_that_does_not_fit_the_config(workspace, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    err = _in_process(capsys, inference.main,
                      _infer_args(workspace, tmp_path / "out", "project_dim=8", checkpoint=workspace.original_ckpt))
    assert "biencoder.best.pt" in err and "shape mismatch" in err


def test_corrupt_txt_db_record(workspace, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    db = shutil.copytree(workspace.data["txt_db"]["test"], tmp_path / "txt_db")
    txt_id = next(iter(json.loads((db / "id2len.json").read_text())))
    put_raw(db, txt_id, b"not lz4 at all")
    err = _in_process(capsys, inference.main, _infer_args(workspace, tmp_path / "out", f"data.test_txt_db={db}"))
    assert repr(txt_id) in err and str(db) in err


def test_image_missing_from_the_img_db(workspace, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    db = shutil.copytree(workspace.data["txt_db"]["test"], tmp_path / "txt_db")
    txt2img = json.loads((db / "txt2img.json").read_text())
    img2txts = json.loads((db / "img2txts.json").read_text())
    name = next(iter(img2txts))
    img2txts = {("ghost_image" if k == name else k): v for k, v in img2txts.items()}
    txt2img = {k: ("ghost_image" if v == name else v) for k, v in txt2img.items()}
    (db / "txt2img.json").write_text(json.dumps(txt2img))
    (db / "img2txts.json").write_text(json.dumps(img2txts))
    err = _in_process(capsys, inference.main, _infer_args(workspace, tmp_path / "out", f"data.test_txt_db={db}"))
    assert "'ghost_image'" in err and "img_db" in err


def test_output_directory_of_another_run(workspace, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    models = {"txt": str(workspace.txt_config), "img": str(workspace.img_config)}
    config = write_config(tmp_path / "c.yaml", itm_config(workspace.data, models, num_train_steps=2))
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("output_dir: elsewhere\n")
    err = _in_process(capsys, train_itm.main, ["--config", config, "--output_dir", out])
    assert str(out) in err and "already holds a run" in err and "--resume" in err
    assert (out / "config.yaml").read_text() == "output_dir: elsewhere\n"
