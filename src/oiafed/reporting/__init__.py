"""Reports on run folders: read them (``runs``), plot them (``plots``), write a
self-contained ``report.html`` (``html``), compare several (``compare``)."""
