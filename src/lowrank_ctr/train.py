"""``lowrank-ctr-train``: prepare data (cached), train, test the best point, optionally compress + fine-tune, write
``results.json`` and print how the run ended. Config in (``conf/train.yaml``: ``pipeline: train``, the base stage
trains), results out; the work is the pipeline's (``lowrank_ctr.pipeline``)."""

from lowrank_ctr.pipeline.runner import entry_point, run  # noqa: F401  (run: the in-process API tests use)

main = entry_point("train")

if __name__ == "__main__":
    main()
