"""`make gpu-check`'s logic, without a GPU: the plan fits the machine's limits, and the runner keeps
going past failed and overlong steps, kills what overruns, and records everything in its folder."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tools import gpu_check  # noqa: E402


def test_the_plan_fits_nine_minutes_and_eight_files(tmp_path):
    steps = gpu_check.plan(tmp_path)
    assert [s.name for s in steps] == ["build", "tests", "sanitizer", "bench"]
    assert gpu_check.check_plan(steps) == []
    build = steps[0]
    assert build.environment["TORCH_CUDA_ARCH_LIST"] == "9.0" and build.environment["MAX_JOBS"] == "16"
    tools = [c[c.index("--tool") + 1] for c in steps[2].commands]
    assert tools == ["memcheck", "racecheck"] and all(gpu_check.KERNEL_SET in c for c in steps[2].commands)
    assert any("--junitxml" in arg for arg in steps[1].commands[0])


def test_check_plan_reports_an_overlong_or_overfull_plan(tmp_path):
    steps = gpu_check.plan(tmp_path)
    steps[0].budget_s = 400
    steps.append(gpu_check.Step("extra", [["true"]], 1, "a.log", outputs=("b", "c")))
    problems = gpu_check.check_plan(steps)
    assert any("budgets add up" in p for p in problems) and any("output files" in p for p in problems)


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), str(tmp_path / "out"), "--dry-run"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "plan ok" in result.stdout and "compute-sanitizer" in result.stdout
    assert not (tmp_path / "out").exists()


def test_the_runner_records_each_step_and_kills_overruns(tmp_path):
    python = sys.executable
    marker = tmp_path / "child-survived"
    # The overlong step's child would write the marker after 3 s unless killed with its parent.
    child = f"import time; time.sleep(3); open({str(marker)!r}, 'w').write('x')"
    overlong = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(30)"
    steps = [
        gpu_check.Step("good", [[python, "-c", "print('hello')"]], 30, "good.log"),
        gpu_check.Step("bad", [[python, "-c", "raise SystemExit(3)"], [python, "-c", "print('never')"]], 30, "bad.log"),
        gpu_check.Step("slow", [[python, "-c", overlong]], 1, "slow.log"),
        gpu_check.Step("after", [[python, "-c", "print('still runs')"]], 30, "after.log"),
    ]
    status = gpu_check.run(tmp_path, steps, ["device: test"])
    assert status == 1
    summary = (tmp_path / "summary.txt").read_text()
    assert "device: test" in summary
    assert "good       passed" in summary and "bad        failed (exit 3)" in summary
    assert "slow       timed out" in summary and "after      passed" in summary
    assert "hello" in (tmp_path / "good.log").read_text()
    assert "never" not in (tmp_path / "bad.log").read_text()
    assert "budget of 1 s ran out" in (tmp_path / "slow.log").read_text()
    import time

    time.sleep(3.5)
    assert not marker.exists(), "the overlong step's child process outlived it"


def test_the_overall_budget_stops_later_steps(tmp_path):
    steps = [gpu_check.Step(name, [[sys.executable, "-c", "import time; time.sleep(5)"]], 30, f"{name}.log")
             for name in ("first", "second")]
    assert gpu_check.run(tmp_path, steps, [], budget_s=1.5) == 1
    summary = (tmp_path / "summary.txt").read_text()
    assert "first      timed out" in summary and "second     timed out" in summary
