"""Whole studies built from the phases above.

    demo.py        make demo: the P-Former variant against the baseline on easy-VQA images
    demo_video.py  the same on the generated moving-shapes clips
    ablate.py      Table 4's (w1, w2) grid and Table 6's P-Former text sizes
    ablate_config.py  its settings (AblateConfig, SMOKE) and the plan's types
    ablate_report.py  each run's evaluation, the ablation table and its loss curves
"""
