"""Plumbing shared by every stage (bottom of the stack): atomic files and hashes, precision names, the
"same settings or refuse" check, and training-run machinery (EMA, checkpoints, resume, the trainer skeleton)."""
