"""The TIS store: the one owner of a TIS folder on disk -- writing, locking, resuming, checking and reading.

Modules: :mod:`.layout` (the files' names, side-cars, run ids, hashes), :mod:`.reading` (reading and checking
TIS files and folders), :mod:`.writer` (claiming a folder, locking, resuming and writing labels); every name is
re-exported here (``from cortex.attribution.store import ...``).

The TIS driver (:mod:`cortex.attribution.tis`) writes through :class:`LabelWriter` and the claim / check
functions below; the statistics, the significance tests and the provenance checks read and re-check through
:func:`read_tis_file` and :func:`check_tis_inputs`. This docstring is the format's specification.

Files of a TIS folder (``results/.../TIS_value_{split}/``, :meth:`cortex.paths.ExperimentPaths.tis_dir`):

* ``label_{k}.csv`` -- a finished label (complete: one row per image of the label, never a name twice).
* ``label_{k}.csv.partial`` -- an unfinished label: same header and rows, appended and flushed row by row;
  renamed to ``label_{k}.csv`` when the label's last image is scored.
* ``label_{k}.csv.run.json`` -- side-car of the label (final or partial): ``{"run_id": "<16 hex>",
  "config": {...}}``, the identity of the run that wrote its rows (same ``run_id`` and ``config`` as
  ``tis_config.json``). Written before the label's first row.
* ``label_{k}.csv.lock`` -- an empty lock file; a process writing label ``k`` holds ``fcntl.flock``
  (exclusive) on it. Left in place (deleting lock files is racy); harmless.
* ``tis_config.json`` -- ``{"run_id": ..., <every score-changing setting>}``, sorted keys: attribution,
  method (channel reduction), nsamples / stdev_spread / noise_scope / seed (stochastic scores),
  noise_device (``sample`` scope: CPU and CUDA generators differ), batch_size (``batch`` / ``authors``
  scopes), ig_steps, baseline (integrated gradients / occlusion), fast (``--fast`` settings or false),
  order (``authors``: the split's order), format (this file's version) and, from ``run_tis``: checkpoint
  (path, sha256 of the state-dict file), model (experiment, model_id, num_classes, width, depth) and data
  (split, sha256 of the split CSV, sha256 of ``codebook.npy`` or null, layout). ``run_id`` is the first
  16 hex digits of the sha256 of the canonical JSON of the other keys. Written atomically under
  ``tis_config.json.lock``; a shard finding different content refuses to start.
* ``runs.json`` -- ``{label: run_id}`` of the finished labels (updated under ``runs.json.lock``).

Integrity rules:

* ``resume=True`` skips finished labels (a finished file holding a name twice is rewritten without the
  repeats; one missing images is reopened as partial) and the rows already in a partial file (a torn last
  line and repeated names are dropped), so a resumed run ends with exactly one row per image;
* any label file (final or partial) written under another ``run_id`` (other settings, another checkpoint
  or dataset) is refused, with or without ``resume``, naming what differs; ``overwrite=True`` deletes
  such files of this shard's labels and starts them over;
* two processes never write one label: the second finds its lock held and skips that label (it says so,
  and the summary lists it under ``"busy"``); shards (``sorted labels[shard::num_shards]``) run side by side;
* a non-finite score is a CortexError naming the image.
* ``tis_writers.lock`` -- a shared ``flock`` held by every writer for its run; an ``--overwrite`` run that
  replaces another run's ``tis_config.json`` needs it exclusively (:func:`hold_writers`).
* ``.label_{k}.csv.*.tmp`` -- the temp file of an atomic write (``cortex.utils.atomic_write``: temp file in
  the same folder, then ``os.replace``); one left behind means a write was interrupted.

Rows: ``filename,label,"[s1, s2, ...]"`` -- one row per image, h*w scores (256 for the paper's 16x16 grid)
written by ``cortex.utils.format_list``; the row length is the first row's (:func:`tis_row_length`).

Reading rules (:func:`read_tis_file`, :func:`check_tis_inputs`): a finished run has a ``label_{k}.csv`` for
every label of the split with one row per image, no ``.partial`` or temp file, no file for a label the dataset
lacks, a ``tis_config.json``, and one ``run_id`` over ``runs.json`` / the side-cars; a NaN/Inf score or an image
listed twice is an error naming the file and line.
"""
from __future__ import annotations

from ...utils import try_lock, unlock  # noqa: F401  (the label locks, as the writer takes them)
from .layout import (FORMAT_VERSION, N_POS, TIS_CONFIG, TIS_HEADER, file_sha1, fingerprint, lock_file,  # noqa: F401
                     partial_file, read_sidecar, run_id_of, short_list, sidecar_file, tis_file)
from .reading import (TisRunInfo, check_tis_inputs, check_tis_rows, read_tis_file, report_problems,  # noqa: F401
                      tis_row_length)
from .writer import (LabelWriter, check_label_files, claim_config, final_names, hold_writers, open_run,  # noqa: F401
                     read_partial, remove_foreign_labels)
