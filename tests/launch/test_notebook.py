"""launch/colab.ipynb runs top to bottom (nbclient) with a tiny setting.

The notebook reads its settings from SIMCLR_NOTEBOOK_* environment variables,
which the kernel inherits from this process: the offline dataset, a few steps
of a tiny batch at 8 px, evaluators on a few images. Any cell that raises fails
the test with that cell's error.
"""
import pathlib

import nbformat
from nbclient import NotebookClient

REPO = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "launch" / "colab.ipynb"

TINY = {
    "DATASET": "mnist_offline",
    "STEPS": "2",
    "BATCH_SIZE": "8",
    "EVAL_EVERY": "1",
    "IMAGE_SIZE": "8",
    "EVAL_EXAMPLES": "40",
    "PROBE_EXAMPLES": "40",
    "RESNET_DEPTH": "18",
}


def test_notebook_is_clean():
  """Committed without outputs, and every cell parses."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None
      compile(cell.source, "<cell>", "exec")
  settings = "".join(c.source for c in nb.cells)
  for name in TINY:
    assert f"setting('{name}'" in settings


def test_notebook_executes(tmp_path, monkeypatch):
  for name, value in TINY.items():
    monkeypatch.setenv(f"SIMCLR_NOTEBOOK_{name}", value)
  monkeypatch.setenv("SIMCLR_NOTEBOOK_WORKDIR", str(tmp_path / "workdir"))
  (tmp_path / "workdir").mkdir()
  (tmp_path / "workdir" / "user_notes.txt").write_text("mine")
  # Matplotlib draws into the notebook, never to a window.
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(nb, timeout=900, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # Raises CellExecutionError naming the failing cell.

  text = "\n".join(
      out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
      for out in cell.outputs if out.output_type == "stream")
  assert "mnist_offline: 2 steps of batch 8" in text
  assert "linear probe test accuracy: pretrained" in text
  images = [out for cell in nb.cells if cell.cell_type == "code"
            for out in cell.outputs if "image/png" in out.get("data", {})]
  assert len(images) == 3  # View pairs, curves, PCA.
  # FRESH (the default) starts a new run directory inside WORKDIR and deletes
  # nothing: a file the user had there stays.
  (run,) = [p for p in (tmp_path / "workdir").iterdir() if p.is_dir()]
  assert run.name.startswith("run-") and (run / "checkpoints").is_dir()
  assert (tmp_path / "workdir" / "user_notes.txt").read_text() == "mine"
