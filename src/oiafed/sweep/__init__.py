"""``oiafed sweep``: a grid of configs times seeds, each cell a run folder under one sweep
folder, run ``jobs`` at a time (or on a Ray cluster), resumable, summed up over seeds.

``grid`` plans and checks it, ``execute`` runs cells, ``summary`` sums them up, ``runner``
does all three (``oiafed.sweep.runner.sweep``), ``command`` is the CLI. Importing this
package costs nothing: the CLI loads the rest when ``oiafed sweep`` runs."""
