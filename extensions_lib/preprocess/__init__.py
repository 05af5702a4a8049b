"""Dataset preprocessing (the WebUI's old Preprocess tab): size, split, focal and auto-sized crops,
flipped copies and captions, written as the WebUI's trainers expect them.

Entry point: :func:`run.preprocess_directory`; CLI: :mod:`.cli` (`alchemy preprocess SRC DST`).
"""
