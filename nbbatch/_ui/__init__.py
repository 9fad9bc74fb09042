"""User interfaces over a store: the ``nbbatch`` command, the notebook magic and widgets, the dashboard."""
