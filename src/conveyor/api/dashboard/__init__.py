"""The web dashboard at ``/ui``: server-rendered pages over the API's own routes.

pages      the routes, forms and event streams; ``install`` adds them to the API app
sessions   signed session cookies naming a key, and their CSRF tokens
templates  Jinja2 pages (autoescaped)
static     the one script and stylesheet the pages load (no CDN, no build step)
"""
