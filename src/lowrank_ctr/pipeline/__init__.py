"""The run pipeline: typed stages, each returning a dataclass and leaving a record in ``RUN/stages/`` when done.

    base (train | load) -> compress -> fine-tune      -> [control] -> [bench]
                        -> from-scratch (compression.from_scratch=true)

- ``runner.run(cfg)``: everything one job does (both console scripts call it; ``pipeline.base`` picks the base stage)
- ``results``: the typed results and the one mapping onto results.json keys
- ``records``: run identity (config hash) and stage records (resume)
- ``rundir``: one run per run directory, and a lock against concurrent runs
- ``context``: shared factories (module, trainer with callbacks from ``conf/callbacks/``, evaluation)
- ``base`` / ``compression`` / ``finetune``: the stages; ``summary``: how a run and a multirun end
"""
