"""The commands on run directories, one module each: ``qat_study`` (``sqjax qat``),
``analyze``, ``layers``, ``grids``, ``cascade``, ``study`` and ``report``; ``precisions``
loads a run's precisions and the trials they are scored on, for all of them.

They read run directories and write files; the analyses themselves (arrays in, results
out) are ``sqjax.analysis``.
"""
