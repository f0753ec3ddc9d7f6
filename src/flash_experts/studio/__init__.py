"""The studio: a local page that shows the experts and the attention at work (`flash-experts studio`)."""
