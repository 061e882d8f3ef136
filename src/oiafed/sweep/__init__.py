"""``oiafed sweep``: a grid of configs times seeds, each cell a run folder under one sweep
folder, run ``jobs`` at a time (or on a Ray cluster), resumable, summed up over seeds.

``grid`` plans and checks it, ``precheck`` builds each grid point's data and model to check
them, ``lock`` keeps a second sweep out of the folder, ``execute`` runs cells, ``summary``
sums them up, ``runner`` does it all (``oiafed.sweep.runner.sweep``), ``command`` is the CLI.
Importing this package costs nothing: the CLI loads the rest when ``oiafed sweep`` runs."""
