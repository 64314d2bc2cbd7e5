"""An example irtool plugin. irtool imports its passes through entry points only when they are used."""
