"""Relative paths given to the CLIs and to `Cluster` are made absolute where they are read (the
servers run in another working directory); hub ids stay as they are."""

from __future__ import annotations

import os
from pathlib import Path

from sglang_eldr import calibrate, launch_cluster, launch_router
from sglang_eldr.launch_cluster import Cluster

ROOT = Path(__file__).resolve().parents[1]
MODEL = "models/tiny-qwen3-moe"
CENTROIDS = MODEL + "/eldr-centroids-2d.eldr"
HUB_ID = "Qwen/Qwen3-30B-A3B"


def test_cli_paths_are_absolute(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    args = launch_cluster.build_parser().parse_args(
        ["--model-path", MODEL, "--centroids", CENTROIDS, "--log-dir", "build/logs", "--host", "127.0.0.1"])
    assert args.model_path == str(ROOT / MODEL) and args.centroids == str(ROOT / CENTROIDS)
    assert args.log_dir == ROOT / "build" / "logs"
    args = launch_cluster.build_parser().parse_args(["--model-path", HUB_ID, "--calibrate", "bench/calib.jsonl", "--host", "127.0.0.1"])
    assert args.model_path == HUB_ID and args.calibrate == str(ROOT / "bench" / "calib.jsonl")

    args = calibrate.build_parser().parse_args(
        ["--url", "http://127.0.0.1:1", "--model-path", MODEL, "--prompts", "p.jsonl", "--decoders", "2",
         "--out", "~/c.eldr"])
    assert (args.model_path, args.prompts) == (str(ROOT / MODEL), str(ROOT / "p.jsonl"))
    assert args.out == os.path.expanduser("~/c.eldr")

    args = launch_router.build_parser().parse_args(
        ["--prefill", "http://127.0.0.1:1", "--decode", "http://127.0.0.1:2", "--centroids", CENTROIDS])
    assert args.centroids == str(ROOT / CENTROIDS)


def test_cluster_resolves_its_paths(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    c = Cluster(model_path=MODEL, centroids=CENTROIDS, host="127.0.0.1", log_dir=Path(os.path.relpath(tmp_path, ROOT)))
    assert c.model_path == str(ROOT / MODEL) and c.centroids == str(ROOT / CENTROIDS)
    assert c.log_dir == tmp_path
    monkeypatch.chdir(tmp_path)  # what a server's working directory is
    assert Path(c.model_path, "config.json").exists() and Path(c.centroids).exists()
    assert Cluster(model_path=HUB_ID, host="127.0.0.1", log_dir=tmp_path).model_path == HUB_ID


def test_calibrate_needs_an_eldr_policy(capsys):
    assert launch_cluster.main(["--model-path", MODEL, "--policy", "jsq", "--calibrate", "calib.jsonl", "--host", "127.0.0.1"]) == 2
    assert "for the eldr policies, not jsq" in capsys.readouterr().err
