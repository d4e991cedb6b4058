"""The base layer of ``training``: what every other part needs, importing none of them.

The config (``config``), the type and range checks of its fields (``field_checks``), its
command line and YAML (``cli``), the errors a user can fix (``errors``), Lightning's autocast
precisions (``precision``) and the config as ``dpo_core``'s settings (``settings``). Above it, each importing only what lies below (``tests/training/
test_layers.py`` checks it): ``embedded`` < ``inputs`` < ``eval`` < ``run`` < the entry points
``fit``, ``evaluate`` and ``sweep``.
"""
