"""`python -m tests.training.enospc_train ARGS`: `spin-mega ARGS` with megatron-core's checkpoint file writer
failing with ENOSPC, part-way through, for files under a directory named by $SPIN_MEGA_TEST_ENOSPC_UNDER.
The disk-full test falls back to it where it may not mount a small tmpfs (not root)."""

from __future__ import annotations

import errno
import os


def _failing_write_item(real):
    target = os.environ["SPIN_MEGA_TEST_ENOSPC_UNDER"]

    def write_item(*args, **kwargs):
        stream = next(a for a in args if hasattr(a, "write"))
        if target in str(getattr(stream, "name", "")):
            stream.write(b"\0" * 4096)  # the disk fills part-way through the file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), stream.name)
        return real(*args, **kwargs)

    return write_item


if __name__ == "__main__":
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async._write_item = _failing_write_item(filesystem_async._write_item)
    from spin_mega.cli import main

    main()
