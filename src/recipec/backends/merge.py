"""The rule for `merge`: per tensor, every input whole in fp32, a kernel from `merge_methods`, cast out.

Selection-based methods (TIES' top-k, SLERP's angle) need each tensor whole, so peak memory is a few
fp32 tensors per thread; the kernels are reproducible across thread counts (see merge_methods).
"""

from __future__ import annotations

import torch

from .arithmetic import TensorPlan, output_tensors, source_name, stream_tensors
from .job import Job, RunFailure
from ..store.tensors import TORCH_DTYPES
from .merge_methods import merge_tensor
from .model_files import copy_model_files


def build_merge(job: Job) -> str:
    params = job.node.params
    with_base = params["with_base"]
    n_models = len(job.inputs) - (1 if with_base else 0)
    weights = params["weights"] or ([1.0 / n_models] * n_models if params["method"] == "linear" else [1.0] * n_models)
    out = output_tensors(job)
    plans = []
    for t in out:
        sources = tuple(source_name(a.files, t.name) for a in job.inputs)
        if None in sources:
            missing = job.inputs[sources.index(None)].path
            raise RunFailure("E502", f"`{t.name}` is missing from {missing}", "re-run `recipec check`")
        plans.append(TensorPlan(t.name, sources, tuple(weights)))

    def compute(plan: TensorPlan, t, readers, writer, kernel) -> None:
        tensors = [r.tensor(s).to(torch.float32) for r, s in zip(readers, plan.sources)]
        base = tensors.pop() if with_base else None
        try:
            merged = merge_tensor(params["method"], plan.name, tensors, base, list(plan.coefficients),
                                  density=params["density"], drop_rate=params["drop_rate"], t=params["t"],
                                  seed=params["seed"], normalize=params["normalize"])
        except ValueError as err:
            raise RunFailure("E502", str(err)) from None
        writer.write(plan.name, merged.to(TORCH_DTYPES[t.dtype]))

    digest = stream_tensors(job, out, plans, compute, shard_size=params["shard_size"])
    copy_model_files(job, out)
    return digest
