"""Issue 11's targets in one command (``python -m benchmarks.cpu_targets``, ``make cpu-targets``): the plan is the
issue's, the verdicts follow the targets' rules, and a dry run measures (each run in a process of its own, with its
allocator settings), judges, writes and resumes end to end."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("detectron2")

from benchmarks import cpu_targets  # noqa: E402
from benchmarks.cpu_targets import REUSE_MALLOC, TARGETS, judge, plan, run, run_figures  # noqa: E402
from benchmarks.settings import OURS  # noqa: E402


def test_plan_is_the_issues():
    planned = plan()
    runs = [p.settings for p in planned]
    cls = [p for p in planned if p.settings.task == "cls" and p.settings.dtype == "fp32"]
    assert len(cls) == 4 and all((p.settings.size, p.settings.batch_size, p.settings.img_size) == ("T", 8, (224, 224))
                                 for p in cls)  # fmt: skip
    det = [p for p in planned if p.settings.task == "det-backbone"]
    assert len(det) == 3 and all((p.settings.size, p.settings.batch_size, p.settings.img_size) == ("T", 1, (1024, 1024))
                                 for p in det)  # fmt: skip
    # glibc's defaults, then once with every freed block reused; only those two runs set allocator variables
    assert [p.malloc_env for p in cls] == [{}, {}, {}, REUSE_MALLOC] and [p.malloc_env for p in det] == [{}, {}, REUSE_MALLOC]
    assert sum(bool(p.malloc_env) for p in planned) == 2
    assert REUSE_MALLOC["MALLOC_MMAP_MAX_"] == "0" and "MALLOC_MMAP_MAX_=0" in det[2].title
    assert [(s.task, s.dtype) for s in runs if s.dtype != "fp32"] == [("cls", "bf16")]
    assert all(s.threads == 2 and s.device == "cpu" for s in runs)
    dry = [p.settings for p in plan(dry_run=True, threads=1)]
    assert len(dry) == len(runs) and all(s.iters == 1 and max(s.img_size) <= 96 and s.threads == 1 for s in dry)
    assert {t.key: t.threshold for t in TARGETS} == {
        "cls_vs_best_peer": 1.4, "cls_share_of_mm": 0.8, "cls_vs_best_peer_reuse": 1.4, "cls_share_of_mm_reuse": 0.8,
        "det_vs_detectron2": 1.5, "det_vs_detectron2_reuse": 1.5, "bf16_vs_fp32": 0.9, "main_job_s": 600,
        "main_job_box_ap": 30,
    }


def _run(task, dtype, p50_ms, gflops=4.7):
    """A run as ``run_benchmark`` reports it: ``ours_speedup`` = the row's p50 / ours' p50."""
    rows = [{"name": n, "images_per_s": 8 / (ms / 1e3), "ours_speedup": ms / p50_ms[OURS]} for n, ms in p50_ms.items()]
    return {"task": task, "settings": {"task": task, "dtype": dtype}, "gflops_per_image": gflops, "models": rows}


def _done(run, gemm=100.0, malloc_env=None):
    return {"run": run, "gemm_fp32_gflops": gemm, "figures": run_figures(run, gemm), "malloc_env": malloc_env or {}}


def test_verdicts_follow_the_targets():
    # timm is the faster peer in the first run, mmpretrain in the second: the ratio is to the faster one
    cls = [_run("cls", "fp32", {OURS: 800, "timm": 1100, "mmpretrain": 1200}),
           _run("cls", "fp32", {OURS: 800, "timm": 1200, "mmpretrain": 1150}),
           _run("cls", "fp32", {OURS: 1000, "timm": 1300, "mmpretrain": 1400})]
    assert run_figures(cls[0], 100.0)["vs_best_peer"] == pytest.approx(1.375)
    # 8 images in 0.8 s at 2 x 4.7 GFLOP each: 94 GFLOP/s, 94% of a 100 GFLOP/s mm
    assert run_figures(cls[0], 100.0)["share_of_mm"] == pytest.approx(0.94)
    det = [_run("det-backbone", "fp32", {OURS: 2000, "detectron2": 3100}),
           _run("det-backbone", "fp32", {OURS: 2000, "detectron2": 2900})]
    bf16 = _run("cls", "bf16", {OURS: 900, f"{OURS} fp32": 850, "timm": 7000})
    reuse = [_done(_run("cls", "fp32", {OURS: 700, "timm": 1050, "mmpretrain": 1100}), malloc_env=REUSE_MALLOC),
             _done(_run("det-backbone", "fp32", {OURS: 2000, "detectron2": 2600}), malloc_env=REUSE_MALLOC)]
    done = [_done(r) for r in (*cls, *det, bf16)] + reuse
    job = {"summary": {"total_s": 612.0, "box_AP_after": 47.7}}

    v = {x["key"]: x for x in judge(done, job, native_bf16=False)}
    assert v["cls_vs_best_peer"]["median"] == pytest.approx(1.375) and v["cls_vs_best_peer"]["met"] is False
    assert v["cls_share_of_mm"]["values"] == pytest.approx([0.94, 0.94, 0.752]) and v["cls_share_of_mm"]["met"]
    assert v["det_vs_detectron2"]["median"] == pytest.approx(1.5) and v["det_vs_detectron2"]["met"]
    # the runs with freed blocks reused are judged on their own, not mixed into the default allocator's medians
    assert v["det_vs_detectron2_reuse"]["values"] == [pytest.approx(1.3)] and v["det_vs_detectron2_reuse"]["met"] is False
    assert v["cls_vs_best_peer_reuse"]["values"] == [pytest.approx(1.5)] and v["cls_vs_best_peer_reuse"]["met"]
    assert v["cls_share_of_mm_reuse"]["values"] == [pytest.approx(8 * 9.4 / 0.7 / 100)]
    assert v["bf16_vs_fp32"]["median"] == pytest.approx(850 / 900) and v["bf16_vs_fp32"]["met"]
    assert v["main_job_s"]["met"] is False and v["main_job_box_ap"]["met"] is True  # 612 s > 600 s

    v = {x["key"]: x for x in judge(done, None, native_bf16=True)}
    assert "met" not in v["bf16_vs_fp32"] and "native bf16" in v["bf16_vs_fp32"]["note"]
    assert v["main_job_s"]["values"] == [] and v["main_job_s"]["note"] == "not measured (no --main-job)"


def test_dry_run_measures_judges_writes_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("MVIT_DET_DATASETS", str(tmp_path / "datasets"))  # the main job's toy data
    out = tmp_path / "targets"
    report = run(out, dry_run=True, main_job=True)

    assert len(report["done"]) == len(plan()) and report["hardware"]["cpu_model"]
    for d in report["done"]:  # real runs: every reference computed what ours did
        assert d["gemm_fp32_gflops"] > 0 and d["figures"]["ours_img_s"] > 0
        assert all(m["max_rel_diff"]["fp32"] < 1e-4 for m in d["run"]["models"][1:])
    summary = report["main_job"]["summary"]
    assert summary["box_AP_after"] >= 0 and (out / "main_job" / "summary.json").is_file()
    verdicts = {v["key"]: v for v in report["verdicts"]}
    assert all(len(v["values"]) == n for v, n in zip(verdicts.values(), (3, 3, 1, 1, 2, 1, 1, 1, 1)))
    # each run reports its own process's allocator settings: the reuse run's variables reached its process only
    reuse = f"MALLOC_TRIM_THRESHOLD_={REUSE_MALLOC['MALLOC_TRIM_THRESHOLD_']}, MALLOC_MMAP_MAX_=0"
    assert [d["malloc"] == reuse for d in report["done"]] == [bool(p.malloc_env) for p in plan()]
    assert verdicts["main_job_s"]["values"] == [summary["total_s"]]
    md = (out / "cpu_targets.md").read_text()
    assert "Dry run" in md and "| detection backbone, ours vs detectron2 |" in md
    assert md.count("| implementation | img/s |") == len(plan()) and f"malloc: {reuse}" in md
    assert json.loads((out / "cpu_targets.json").read_text())["done"] == json.loads(json.dumps(report["done"]))

    # A rerun keeps what was measured with the same plan, CPU and threads: nothing runs again.
    monkeypatch.setattr(cpu_targets, "run_child", lambda *a: pytest.fail("a kept run was measured again"))
    monkeypatch.setattr(cpu_targets, "run_main_job", lambda *a: pytest.fail("the kept main job ran again"))
    again = run(out, dry_run=True, main_job=True)
    assert again["done"] == json.loads(json.dumps(report["done"])) and again["main_job"]["summary"] == summary


def test_a_main_job_folder_without_its_result_is_refused_before_any_run(tmp_path, monkeypatch):
    (tmp_path / "main_job").mkdir()  # an interrupted job: its reused pre-training would make the time wrong
    monkeypatch.setattr(cpu_targets, "run_child", lambda *a: pytest.fail("benchmarks ran before the refusal"))
    with pytest.raises(SystemExit, match="holds an earlier main job"):
        run(tmp_path, dry_run=True, main_job=True)
    run_dir = tmp_path / "no_job"
    (run_dir / "main_job").mkdir(parents=True)
    # without --main-job the folder is not in the way
    monkeypatch.setattr(cpu_targets, "run_child", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        run(run_dir, dry_run=True, main_job=False)


def test_targets_still_to_come_are_named_so():
    done = [_done(_run("cls", "fp32", {OURS: 800, "timm": 1100, "mmpretrain": 1200}))]
    v = {x["key"]: x for x in judge(done, None, native_bf16=False, pending=["det_vs_detectron2", "main_job_s"])}
    assert v["det_vs_detectron2"]["note"] == "not measured yet" and v["main_job_s"]["note"] == "not measured yet"
    assert v["main_job_box_ap"]["note"] == "not measured (no --main-job)"
    assert v["cls_vs_best_peer"]["met"] is False and "note" not in v["cls_vs_best_peer"]


def test_bad_command_lines_are_refused_with_one_line(tmp_path, capsys):
    a_file = tmp_path / "report.md"
    a_file.write_text("mine")
    for argv, words in (([str(a_file)], "is a file"), ([str(tmp_path / "x"), "--threads", "0"], "--threads")):
        with pytest.raises(SystemExit) as e:
            cpu_targets.main(argv)
        assert e.value.code == 2 and words in capsys.readouterr().err
    assert a_file.read_text() == "mine"


def test_main_job_without_a_checkout_is_refused_before_any_run(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_targets, "ROOT", tmp_path / "site-packages")  # as installed from a wheel: no tools/
    monkeypatch.setattr(cpu_targets, "run_child", lambda *a: pytest.fail("benchmarks ran before the refusal"))
    with pytest.raises(SystemExit, match="runs tools/main_job.py of a checkout"):
        run(tmp_path / "out", dry_run=True, main_job=True)
