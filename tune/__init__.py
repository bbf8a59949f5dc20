"""Ray Tune sweeps over run configs: a checked sweep file (spec), a trainable that runs the engine (trainable), the
driver that starts or joins Ray and runs or resumes the sweep (runner), and the results table, best config and plot
(results). Ray is imported only where a sweep actually runs, so the checks work without starting it.
"""
