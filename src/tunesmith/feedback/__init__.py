"""Human feedback: a local web page that shows two responses per prompt and records the preferred one."""

from tunesmith.feedback.server import FeedbackStore, make_server, serve

__all__ = ["FeedbackStore", "make_server", "serve"]
