"""Command-line programs (argument parsing and ``main``), installed as console scripts:
``dreamprm-train``, ``dreamprm-evaluate``, ``dreamprm-make-synthetic`` and
``dreamprm-compare-hypergradients``. From a checkout, ``python -m experiments.<name>`` runs
the same program."""
