"""Extra result keys computed in every test evaluation, chosen with ``extra_metrics=[NAME,...]``.

One file per metric here (a torchmetrics ``Metric`` whose ``update`` takes ``(logits, labels)`` and whose
``compute`` returns a number or None) plus ``conf/extra_metrics/NAME.yaml``; its value lands in results.json as
``test/NAME`` (and ``base/test/NAME``, ``control/test/NAME`` where those models are tested).
"""
