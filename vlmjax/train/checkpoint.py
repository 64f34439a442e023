"""Orbax checkpoints: async save every N steps, keep the last K, atomic (orbax writes to a temporary directory
and renames it), restored onto whatever shardings the caller's abstract state carries (so a run can resume on
a different device count). The data iterator's state travels in the same checkpoint as JSON.

Saves happen only at multiples of `save_every` or when forced (orbax on its own also saves the first step of a
fresh run, costly at 7B; `save_first_step=True` keeps that). A checkpoint that cannot be read (metadata or
manifest gone, torn files) is moved aside to `checkpoints.corrupt/` and the previous one is used, with a
warning naming both: a fault never ends a resume in a raw orbax traceback, and nothing is deleted.
"""

from __future__ import annotations

import logging
import os
import shutil

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class NoUsableCheckpoint(RuntimeError):
    pass


class Checkpointer:
    def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True,
                 save_first_step: bool = False):
        self.directory = os.path.abspath(directory)
        self.save_every, self.save_first_step = save_every, save_first_step
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, *, force: bool = False) -> bool:
        if not force and step % self.save_every and not (self.save_first_step and step == 1):
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
        return self.manager.save(step, args=args, force=force or (self.save_first_step and step == 1))

    def restore(self, step: int, like_state):
        """`like_state`: the current (freshly initialised, placed) state; its shapes/dtypes/shardings are the target."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore())
        out = self.manager.restore(step, args=args)
        return out.state, out.data

    def restore_latest(self, like_state):
        """-> (step, state, data_state) from the newest readable checkpoint, or None when there is none.
        Unreadable newer ones are moved to `checkpoints.corrupt/STEP` (kept for inspection)."""
        bad = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, data = self.restore(step, like_state)
            except Exception as e:  # orbax raises many types for a torn checkpoint; all mean "not this one"
                log.warning("checkpoint step %d in %s cannot be restored (%s: %s)", step, self.directory,
                            type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                bad.append(step)
                continue
            if bad:
                log.warning("checkpoint(s) %s in %s are unreadable; resuming from the previous good one, step %d "
                            "(the bad ones are moved to %s)", bad, self.directory, step, self._corrupt_dir())
                self._set_aside(bad)
            return step, state, data
        if bad:
            self._set_aside(bad)
            raise NoUsableCheckpoint(f"no checkpoint in {self.directory} can be restored (steps {bad}, moved to "
                                     f"{self._corrupt_dir()}); delete the workdir to start over")
        return None

    def _corrupt_dir(self) -> str:
        return self.directory.rstrip("/") + ".corrupt"

    def _set_aside(self, steps: list[int]) -> None:
        if jax.process_index() == 0:
            os.makedirs(self._corrupt_dir(), exist_ok=True)
            for s in steps:
                src = os.path.join(self.directory, str(s))
                if os.path.exists(src):
                    dst = os.path.join(self._corrupt_dir(), str(s))
                    if os.path.exists(dst):
                        shutil.rmtree(dst)
                    os.replace(src, dst)
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
