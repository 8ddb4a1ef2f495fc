"""`python -m spin_mega.evaluation`: the loop's evaluation stage, in a process of its own."""

from spin_mega.evaluation.heldout import main

raise SystemExit(main())
