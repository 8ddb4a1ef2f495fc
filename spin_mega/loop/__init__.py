"""The SPIN loop (`spin-mega run`): the driver (driver.py) and the launchers that start its stages in
processes of their own, on this node or as srun steps across a Slurm allocation."""
