"""The one generation path: conversation or text → prompt ids (`prompts`) → tokens from an engine
(`engines`) → text cut at stop tokens and stop strings (`text`), put together by `answers`."""
