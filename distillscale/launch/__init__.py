"""Where and how many processes run: rank helpers, allocation checks, sweep grids.

The Slurm and local launchers (`launchers/*.sh`) call into this package through
`distillscale launch ...`, so the experiment schema stays the single source of truth.
"""
