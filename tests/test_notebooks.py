"""Every notebook in notebooks/ runs end to end and writes its figures.

Each notebook is executed by nbclient in a python3 kernel of this interpreter, its
parameters passed by the environment variables its parameters cell reads: `FIGURES` a
temporary folder, and `RESULTS`: None for 04 (so it makes its own small sweep on synthetic
data, `rewind.step=0,20` with `train.save_weights=true`, by the `lottery` command), and that
sweep for the others (one sweep of two small runs is all the training this file does). Set
`LOTTERY_TEST_NOTEBOOK_RUNS=1` to also run every notebook with its own run (RESULTS = None;
about 30 s more per notebook). The kernel and the runs it starts inherit the test
environment of conftest.py (W&B disabled, an empty data cache, two CPU devices, the
session's compilation cache).
"""

import fnmatch
import json
import os
import time
from pathlib import Path

import pytest

import ipykernel  # noqa: F401  (the kernel the notebooks run in: a dev dependency)
import nbclient
import nbformat

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"

# The figures each notebook must write, as patterns (a notebook not listed: at least one PNG).
FIGURES = {
    "01_tickets_vs_controls": {"tickets_vs_controls*.png", "learning_curves.png"},
    "02_rewind_and_sparsity_sweep": {"accuracy_vs_density.png", "accuracy_vs_rewind_step.png"},
    "03_instability": {"barrier_vs_rewind_step.png", "interpolation_curves.png"},
    "04_masks_and_weights": {"level_overlap.png", "replicate_overlap.png", "run_overlap.png",
                             "init_histograms.png", "sign_agreement.png"},
}


def notebooks():
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def execute(path: Path, cwd: Path, results=None, figures=None):
    """Run the notebook at `path` in a fresh kernel with the working directory `cwd` and
    RESULTS = `results`, FIGURES = `figures` (default `cwd/figures`); returns the executed
    notebook (nbclient's CellExecutionError on a failing cell)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LOTTERY_NOTEBOOK_FIGURES", str(figures or cwd / "figures"))
        if results is None:
            patch.delenv("LOTTERY_NOTEBOOK_RESULTS", raising=False)
        else:
            patch.setenv("LOTTERY_NOTEBOOK_RESULTS", str(results))
        notebook = nbformat.read(path, as_version=4)
        client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                         resources={"metadata": {"path": str(cwd)}})
        client.execute()  # the kernel starts with this environment
    return notebook


MAKES_THE_SWEEP = "04_masks_and_weights"  # run with RESULTS = None; the others read its sweep
OWN_RUN = {"03_instability"}  # notebooks the sweep cannot serve (their own kind of run): RESULTS = None too


def check_figures(path: Path, notebook, figures: Path) -> set[str]:
    written = {f.name for f in figures.glob("*.png")}
    for pattern in FIGURES.get(path.stem, {"*.png"}):
        assert fnmatch.filter(written, pattern), f"{path.name}: no figure {pattern} in {written}"
    for name in written:
        assert (figures / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs
              if o.get("output_type") == "error"]
    assert not errors
    return written


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Notebook 04 run with RESULTS = None: its working directory, the sweep it made
    (two runs, rewind.step 0 and 20, trained weights saved), the executed notebook and the
    seconds it took."""
    cwd = tmp_path_factory.mktemp("sweep")
    started = time.perf_counter()
    notebook = execute(NOTEBOOKS / f"{MAKES_THE_SWEEP}.ipynb", cwd)
    seconds = time.perf_counter() - started
    made = [p for p in (cwd / "outputs" / "notebooks").glob("*/*") if p.is_dir()]
    assert len(made) == 1, f"the notebook made {made}"
    return cwd, made[0], notebook, seconds


def test_notebooks_are_committed_without_outputs():
    assert notebooks(), f"no notebooks in {NOTEBOOKS}"
    for path in notebooks():
        notebook = json.loads(path.read_text())
        first_code = next(c for c in notebook["cells"] if c["cell_type"] == "code")
        assert "RESULTS" in "".join(first_code["source"]), f"{path.name}: no parameters cell first"
        for cell in notebook["cells"]:
            if cell["cell_type"] == "code":
                assert not cell["outputs"] and cell["execution_count"] is None, \
                    f"{path.name}: committed with outputs"


@pytest.mark.parametrize("path", notebooks(), ids=lambda p: p.stem)
def test_notebook_runs_and_writes_its_figures(path, sweep, tmp_path):
    cwd, results, notebook, seconds = sweep
    if path.stem == MAKES_THE_SWEEP:  # ran with RESULTS = None: made its own runs
        assert len(list(results.rglob("record.jsonl"))) == 2
        assert list(results.rglob("trained_02.npz"))
        written = check_figures(path, notebook, cwd / "figures")
    elif path.stem in OWN_RUN:
        started = time.perf_counter()
        notebook = execute(path, tmp_path)
        seconds = time.perf_counter() - started
        written = check_figures(path, notebook, tmp_path / "figures")
        assert list((tmp_path / "outputs" / "notebooks").rglob("record.jsonl"))
    else:  # given the results: makes no run, writes FIGURES where told
        started = time.perf_counter()
        notebook = execute(path, tmp_path, results=results, figures=tmp_path / "some figures")
        seconds = time.perf_counter() - started
        written = check_figures(path, notebook, tmp_path / "some figures")
        assert not (tmp_path / "outputs").exists()
    print(f"{path.name}: {seconds:.1f}s, {sorted(written)}")


@pytest.mark.skipif(not os.environ.get("LOTTERY_TEST_NOTEBOOK_RUNS"),
                    reason="set LOTTERY_TEST_NOTEBOOK_RUNS=1 to run every notebook's own run")
@pytest.mark.parametrize("path", notebooks(), ids=lambda p: p.stem)
def test_notebook_makes_its_own_run(path, tmp_path):
    notebook = execute(path, tmp_path)
    check_figures(path, notebook, tmp_path / "figures")
    assert list((tmp_path / "outputs" / "notebooks").rglob("record.jsonl"))
