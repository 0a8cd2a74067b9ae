"""`ayar ui`: the whole loop in a browser (gradio). The handlers (train_form, runs, chat, stages) are plain
functions over the Python API (ayar/api.py), testable without a browser; app.py lays them out; jobs.py runs the
long work (training, evaluation, export, a server) in processes of their own, with their state on disk."""
