"""The dashboard's cluster model: every agent's stream in one picture, and the rules over it (no Textual)."""
