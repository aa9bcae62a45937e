"""hessdiag's command line (installed as ``hessdiag.cli``): option parsing, rendering, exit
codes. Numerics live in the library; this package only calls it."""
