"""Task-vector cosine similarity, FusionBench's ``TaskVectorCosSimilarity`` analysis.

Each τ_t (float32 deltas, keys sorted) is cast to float64; the pairwise dot products are summed
tensor by tensor, so no task vector is held whole. Writes the CSV in FusionBench's layout (task
names as header row and first column) and a heatmap PNG beside it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from clipship.errors import MethodError
from clipship.merge.engine import iter_inputs
from clipship.outputs import check_target, refuse_link, write_bytes_atomic
from clipship.pool import ModelPool, open_pool

CSV_NAME = "task_vector_cos_similarity.csv"
PNG_NAME = "task_vector_cos_similarity.png"


def cosine_similarity_matrix(pool: ModelPool) -> torch.Tensor:
    """[N, N] float64 cosine similarities between the pool's task vectors."""
    n = len(pool.models)
    dots = torch.zeros(n, n, dtype=torch.float64)
    for x in iter_inputs(pool, pool.float_names(), seed=0, check=True):
        vectors = torch.stack(x.task_vectors).to(torch.float64)
        dots += vectors @ vectors.T
    norms = dots.diagonal().sqrt()
    return dots / torch.clamp(torch.outer(norms, norms), min=1e-300)


def write_csv(path: Path, names: list[str], matrix: torch.Tensor) -> None:
    rows = ["," + ",".join(names)]
    rows += [name + "," + ",".join(repr(float(v)) for v in row) for name, row in zip(names, matrix)]
    write_bytes_atomic(path, ("\n".join(rows) + "\n").encode())


def write_heatmap(path: Path, names: list[str], matrix: torch.Tensor) -> None:
    import io

    from clipship.runtime.state import figure

    size = 1.2 + 0.7 * len(names)
    fig = figure(figsize=(size + 1.5, size), dpi=120)
    ax = fig.subplots()
    image = ax.imshow(matrix.numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            value = float(matrix[i, j])
            ax.text(
                j,
                i,
                f"{value:.2f}",
                ha="center",
                va="center",
                color="white" if abs(value) > 0.6 else "black",
                fontsize=8,
            )
    fig.colorbar(image, ax=ax, label="cosine similarity")
    ax.set_title("Task-vector cosine similarity")
    fig.tight_layout()
    buffer = io.BytesIO()
    # No timestamp or software version in the file, so reruns give the same bytes.
    fig.savefig(buffer, format="png", metadata={"Software": None})
    write_bytes_atomic(path, buffer.getvalue())


def analyze_similarity(
    pretrained: str,
    models: dict[str, str],
    out: Path | str,
    *,
    force: bool = False,
    allow_pickle: bool = False,
    plot: bool = True,
) -> dict[str, object]:
    """Write ``task_vector_cos_similarity.csv`` (and ``.png``) into ``out``; returns the matrix."""
    out = Path(out)
    check_target(out / CSV_NAME, force)
    refuse_link(out / PNG_NAME)  # both outputs checked before either is written
    pool = open_pool(pretrained, models, allow_pickle=allow_pickle)
    try:
        if len(pool.models) < 2:
            raise MethodError("similarity needs at least 2 fine-tuned models")
        matrix = cosine_similarity_matrix(pool)
    finally:
        pool.close()
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / CSV_NAME, pool.names, matrix)
    files = [str(out / CSV_NAME)]
    if plot:
        write_heatmap(out / PNG_NAME, pool.names, matrix)
        files.append(str(out / PNG_NAME))
    return {"tasks": pool.names, "matrix": matrix.tolist(), "files": files}
