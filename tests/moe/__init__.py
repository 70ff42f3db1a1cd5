"""MoE (issue 12 item 3): MindFormers grouped experts from an independent HF-style truth, and tests."""
