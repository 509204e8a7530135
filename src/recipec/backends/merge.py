"""The rule for `merge`: per tensor, every input whole in fp32, a kernel from `merge_methods`, cast out.

Selection-based methods (TIES' top-k, SLERP's angle) need each tensor whole, so peak memory is a few
fp32 tensors per thread; the kernels are reproducible across thread counts (see merge_methods). Which
tensors and rows take part follows the vocabulary policies `combine` has (`tensor_plans`): under
`embeddings="overlap"` the method merges the rows all models share, the first model's extra rows and
the special tokens' rows are copied as `combine` copies them.
"""

from __future__ import annotations

import torch

from .arithmetic import TensorPlan, finish_rows, output_tensors, stream_tensors, tensor_plans
from .job import Job, RunFailure
from ..ops.merge import Merge
from ..store.tensors import TORCH_DTYPES
from .merge_methods import merge_tensor
from .model_files import copy_model_files


def build_merge(job: Job) -> str:
    params: Merge.Params = Merge.params_of(job.node)
    with_base = params.with_base
    weights = params.model_weights(len(job.inputs) - (1 if with_base else 0))
    out = output_tensors(job, params.dtype)
    plans = tensor_plans(job, out, params, weights, lambda name: weights)

    def compute(plan: TensorPlan, t, readers, writer, kernel) -> None:
        dtype = TORCH_DTYPES[t.dtype]
        parts = [r.tensor(s) for r, s in zip(readers, plan.sources)]
        if plan.copy_first:
            writer.write(plan.name, parts[0].to(dtype))
            return
        tensors = [(p if plan.rows is None else p[:plan.rows]).to(torch.float32) for p in parts]
        base = tensors.pop() if with_base else None
        try:
            merged = merge_tensor(params.method, plan.name, tensors, base, list(plan.coefficients),
                                  density=params.density, drop_rate=params.drop_rate, t=params.t,
                                  seed=params.seed, normalize=params.normalize)
        except ValueError as err:
            raise RunFailure("E502", str(err)) from None
        if plan.rows is None and not plan.row_overrides:
            writer.write(plan.name, merged.to(dtype))
            return
        whole = torch.empty(t.shape, dtype=dtype)
        whole[:merged.shape[0]].copy_(merged)
        finish_rows(whole, plan, parts)
        writer.write(plan.name, whole)

    digest = stream_tensors(job, out, plans, compute, shard_size=params.shard_size)
    copy_model_files(job, out, weights)
    return digest
