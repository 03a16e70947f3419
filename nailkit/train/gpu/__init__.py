"""Training on a lent GPU machine: the parts of ``tools/gpu_train.sh`` that run there, and the parts that
run here before and after.

The machine (an H200, no network) gets a copy of the working tree (≤ 64 MiB: tracked files + untracked files that are
not ignored + carried paths) and gives back ≤ 8 files of ≤ 16 MiB, ≤ 64 MiB per call, from ``$OUT``; files outside
``$OUT`` survive between calls while it stays warm (30 s). So:

here, before     ``requirement_closure`` / ``python -m nailkit.train.gpu wheels`` lists (and downloads) the wheels that rfdetr's
                 training needs beyond what the machine has preinstalled, walking each package's ``Requires-Dist``;
                 ``check_wheels`` checks the carried folder's own ``Requires-Dist``; ``untrack`` takes the tracked
                 demo model out of the transfer (``git rm --cached`` + a ``.gitignore`` beside it: see ``untrack``
                 for why not ``.git/info/exclude``) and ``check_transfer`` sums what would travel.
there, call 1    ``install-wheels`` (only what is missing or does not satisfy a carried wheel's requirement, ``--no-index
                 --no-deps``), ``machine-train`` (make-dataset with the same seed, train-demo on cuda with a large
                 batch for N minutes, package the fp32 ``.pth``, evaluate the test split, split the ``.pth`` into
                 chunks with a sha256 manifest) and ``stage --call 0``.
there, calls 2…  ``stage --call K`` copies the next chunks (+ the manifest) to ``$OUT`` while the machine is warm.
here, after      ``restore`` puts the model back in the index exactly as it was; ``assemble`` checks every chunk's
                 size and sha256 and the whole file's, refuses a corrupt or missing one, and writes the ``.pth``;
                 ``python -m nailkit model-card`` writes its card.

Modules: ``limits`` (what a device call carries and returns; ``GpuTransferError``), ``wheels`` (what to carry and
install), ``transfer`` (the working tree that travels; untrack / restore of the tracked model), ``machine``
(``machine_train``, there), ``chunks`` (split, stage, reassemble with sha256), ``__main__`` (the commands above).
"""
