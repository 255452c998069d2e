"""Every notebook in ``notebooks/`` runs top to bottom on a tiny model.

Each notebook reads its parameters from environment variables (``CBQ_NB_*``; results.ipynb:
``CBQ_SWEEP_DIR``); ``SPECS`` holds, per notebook file, the variables that point it at a
tiny model and tiny data, and a check run in the notebook's kernel after its last cell.
Values are ``str.format``-ed with the paths of the ``placeholders`` fixture (``{corpus}``: a
small .txt corpus, ``{tmp}``: a fresh directory, ``{sweeps}``: synthetic sweep dirs). A
notebook without an entry fails the test: add one.

The kernel is the ``python3`` kernel spec, which jupyter_client starts with the current
interpreter (``sys.executable``); the check cell asserts that it did.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from test_report import write_example_sweeps

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CELL_TIMEOUT_S = 180
KERNEL = "python3"


@dataclass(frozen=True)
class NotebookSpec:
    env: dict[str, str]  # environment of the kernel; values formatted with the placeholders
    check: str = ""  # Python run in the kernel after the last cell; fails by raising
    min_figures: int = 0  # PNG outputs the executed notebook must hold


SPECS: dict[str, NotebookSpec] = {
    "outliers.ipynb": NotebookSpec(
        env={
            "CBQ_NB_MODEL": "tiny:llama",
            "CBQ_NB_CORPUS": "{corpus}",
            "CBQ_NB_SAMPLES": "4",
            "CBQ_NB_SEQLEN": "32",
            "CBQ_NB_FIG_DIR": "{tmp}/figures",
        },
        check="""
n_blocks = len(adapter.blocks())
assert set(act_summary["block"]) == set(range(n_blocks)), act_summary
assert len(act_summary) == n_blocks * len(adapter.scale_groups(adapter.blocks()[0]))
assert len(weight_summary) == n_blocks * len(adapter.linear_names())
assert (act_summary["outliers"] <= act_summary["coarse"]).all()
ratios = act_summary["max/median before"], act_summary["max/median after (reserved)"]
assert (ratios[1] <= ratios[0] + 1e-4).all(), act_summary
assert findings and set(figures) == {"activation_channels", "weight_histograms", "by_block"}
assert sorted(p.name for p in Path(FIG_DIR).iterdir()) == sorted(f"{n}.png" for n in figures)
""",
        min_figures=3,
    ),
    "results.ipynb": NotebookSpec(
        env={"CBQ_SWEEP_DIR": "{sweeps}"},
        check="""
assert set(tables) == {4, 5} and all(table.rows for table in tables.values())
assert set(figures) == {"ppl_vs_bits_smol", "window_loss_smol"}
""",
        min_figures=2,
    ),
}


def notebook_paths() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


@pytest.fixture
def placeholders(tiny_corpus: Path, tmp_path: Path) -> dict[str, str]:
    # {sweeps}: synthetic Table 4 and 5 sweep dirs (os.pathsep-separated), for results.ipynb
    sweeps = os.pathsep.join(map(str, write_example_sweeps(tmp_path / "sweeps")))
    return {"corpus": str(tiny_corpus), "tmp": str(tmp_path), "sweeps": sweeps}


def png_outputs(nb: nbformat.NotebookNode) -> int:
    return sum(
        "image/png" in output.get("data", {})
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )


def check_cell(spec: NotebookSpec) -> nbformat.NotebookNode:
    """The spec's check, preceded by a check that the kernel runs this interpreter."""
    source = (
        "import sys\n"
        f"assert sys.prefix == {sys.prefix!r}, f'kernel runs {{sys.executable}}'\n"
        f"{spec.check.strip()}\n"
    )
    return nbformat.v4.new_code_cell(source)


@pytest.mark.parametrize("path", notebook_paths(), ids=lambda p: p.name)
def test_notebook_runs(
    path: Path, placeholders: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = SPECS.get(path.name)
    if spec is None:
        pytest.fail(f"no NotebookSpec for {path.name}: add its environment to SPECS")
    for name, value in spec.env.items():
        monkeypatch.setenv(name, value.format(**placeholders))
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(check_cell(spec))
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name=KERNEL,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on failure
    assert png_outputs(nb) >= spec.min_figures


def test_notebooks_are_saved_without_outputs() -> None:
    """Notebooks are committed clean: no outputs, no execution counts (small diffs)."""
    for path in notebook_paths():
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs, f"{path.name}: a cell has outputs"
                assert cell.execution_count is None, f"{path.name}: a cell has a count"
