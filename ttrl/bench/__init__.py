"""`make bench`: ttrl measured side by side against bare vLLM and TRL (see __main__)."""
