"""``lowrank-ctr-compress``: compress a trained checkpoint, fine-tune, test, benchmark -> ``results.json``. The same
pipeline as ``lowrank-ctr-train`` with a base stage that loads ``ckpt_path`` (``conf/compress.yaml``:
``pipeline: load``)."""

from lowrank_ctr.pipeline.runner import entry_point, run  # noqa: F401

main = entry_point("compress")

if __name__ == "__main__":
    main()
