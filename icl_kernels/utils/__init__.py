"""Helpers with no knowledge of models or tasks: validated options, intervals and seeds, atomic files, figures, errors."""
