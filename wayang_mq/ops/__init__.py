"""Operating the fabric: the reaper and the dead-letter tools."""
