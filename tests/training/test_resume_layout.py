"""Which resumes the checkpoint format allows, refused before anything is loaded."""

from __future__ import annotations

import pytest

from spin_mega.errors import SpinMegaError
from spin_mega.training.checkpoint import check_resume_layout

DISTRIBUTED_TP2 = {"tensor_parallel": 2, "pipeline_parallel": 1, "distributed_optimizer": True}


def test_distributed_optimizer_state_resumes_at_its_model_parallel_layout_only():
    check_resume_layout(DISTRIBUTED_TP2, dict(DISTRIBUTED_TP2))  # any DP size: DP is not part of the layout
    with pytest.raises(SpinMegaError, match="written at tensor parallel 2 x pipeline parallel 1 and reloads"):
        check_resume_layout(DISTRIBUTED_TP2, dict(DISTRIBUTED_TP2, tensor_parallel=1))
    # Another layer split or virtual pipeline changes the flat buffers just as another TP or PP does.
    pp2 = {"tensor_parallel": 1, "pipeline_parallel": 2, "distributed_optimizer": True, "first_stage_layers": 4}
    with pytest.raises(SpinMegaError, match=r"first/last stage layers 4/None\) and reloads"):
        check_resume_layout(pp2, dict(pp2, first_stage_layers=5))
    with pytest.raises(SpinMegaError, match="not at tensor parallel 1 x pipeline parallel 2 x virtual pipeline 2"):
        check_resume_layout(pp2, dict(pp2, virtual_pipeline_parallel=2, first_stage_layers=None))


def test_plain_optimizer_state_reshards_and_formats_do_not_mix():
    plain = dict(DISTRIBUTED_TP2, distributed_optimizer=False)
    check_resume_layout(plain, {"tensor_parallel": 1, "pipeline_parallel": 2, "virtual_pipeline_parallel": 2})
    with pytest.raises(SpinMegaError, match="distributed_optimizer=false; resume with the same setting"):
        check_resume_layout(plain, dict(DISTRIBUTED_TP2))


def test_distributed_optimizer_state_of_experts_resumes_at_its_expert_layout_only():
    """Expert weights have their own flat buffers over expert-DP: another EP or expert TP changes them. (Seen
    on CPU: a checkpoint written at EP 2 fails to load at EP 1 inside megatron-core with a KeyError.) A
    checkpoint written before expert parallelism existed counts as EP 1."""
    ep2 = dict(DISTRIBUTED_TP2, expert_parallel=2)
    check_resume_layout(ep2, dict(ep2))
    with pytest.raises(SpinMegaError, match=r"written at tensor parallel 2 x pipeline parallel 1 x expert parallel 2 "
                                            r"\(expert tensor parallel 1\) and reloads only there"):
        check_resume_layout(ep2, dict(ep2, expert_parallel=1))
    with pytest.raises(SpinMegaError, match="not at tensor parallel 2 x pipeline parallel 1 x expert parallel 2 "
                                            r"\(expert tensor parallel 2\)"):
        check_resume_layout(ep2, dict(ep2, expert_tensor_parallel=2))
    check_resume_layout(DISTRIBUTED_TP2, dict(DISTRIBUTED_TP2, expert_parallel=1, expert_tensor_parallel=1))
