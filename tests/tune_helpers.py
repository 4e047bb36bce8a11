"""Helpers the tune tests import by name inside Ray workers (``tests.tune_helpers:...``)."""

from __future__ import annotations

import os

import numpy as np


def crash_when_far(
    outputs: list[np.ndarray], labels: np.ndarray | None, reference: list[np.ndarray]
) -> float:
    """Accuracy, but the process dies (as a segfaulting kernel would) when the outputs are far from the reference."""
    ref, out = reference[0].ravel().astype(np.float64), outputs[0].ravel().astype(np.float64)
    cosine = float(ref @ out / max(np.linalg.norm(ref) * np.linalg.norm(out), 1e-12))
    if cosine < 0.98:
        os._exit(3)
    return float(np.mean(outputs[0].argmax(-1) == labels))


def thread_pools(model_path: str) -> dict[str, int]:
    """The thread pools a trial's work would use in this process: ORT sessions, torch, the BLAS under numpy."""
    import torch
    from threadpoolctl import threadpool_info

    from modelpress.runtime.session import make_session

    session = make_session(model_path)
    pools = {
        "ort": session.get_session_options().intra_op_num_threads,
        "torch": torch.get_num_threads(),
        "torch_interop": torch.get_num_interop_threads(),
    }
    pools.update({f"blas:{p['internal_api']}": p["num_threads"] for p in threadpool_info()})
    return pools


def fail_after_work(seconds: float) -> None:
    """Spends ``seconds`` of CPU, then raises: a trial that fails late."""
    import time

    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
    raise ValueError("refused after   some work")
