"""Which resumes the checkpoint format allows, refused before anything is loaded."""

from __future__ import annotations

import pytest

from spin_mega.errors import SpinMegaError
from spin_mega.training.checkpoint import check_resume_layout

DISTRIBUTED_TP2 = {"tensor_parallel": 2, "pipeline_parallel": 1, "distributed_optimizer": True}


def test_distributed_optimizer_state_resumes_at_its_tp_pp_layout_only():
    check_resume_layout(DISTRIBUTED_TP2, 2, 1, True)  # any DP size: DP is not part of the check
    with pytest.raises(SpinMegaError, match="written at tensor parallel 2 x pipeline parallel 1"):
        check_resume_layout(DISTRIBUTED_TP2, 1, 1, True)


def test_plain_optimizer_state_reshards_and_formats_do_not_mix():
    plain = dict(DISTRIBUTED_TP2, distributed_optimizer=False)
    check_resume_layout(plain, 1, 2, False)
    with pytest.raises(SpinMegaError, match="distributed_optimizer=false; resume with the same setting"):
        check_resume_layout(plain, 2, 1, True)
