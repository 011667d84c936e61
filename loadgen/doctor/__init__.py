"""The prefix doctor: what in a traffic log keeps prompts from sharing cached prefixes, found offline."""
