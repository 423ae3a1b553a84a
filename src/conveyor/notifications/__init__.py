"""Notifications: e-mail, webhooks and SMS as jobs, switched on by ``CONVEYOR_NOTIFICATIONS``.

Built only from Conveyor's public face (``app.task``, ``submit``, rate limits), so
it is also an example of a workload a user could write::

    guard.py      which addresses webhooks and the SMS provider may reach (SSRF guard)
    smtp.py       sending one message over SMTP
    webhooks.py   Standard Webhooks signatures, and one signed POST
    sms.py        one message through a Twilio-shaped provider
    templates.py  Jinja2 templates: the built-in ones here, yours before them
    records.py    what was sent (checked before sending again) and recipients' opt-outs
    workload.py   the tasks, ``install(app)`` and ``notify(app, ...)``
    email_templates.py  e-mail templates stored in the database, compiled and versioned
    mailing.py    a stored template sent as a pipeline render -> send -> record; batches

Its HTTP faces, ``/v1/notifications`` and ``/v1/email-templates``, are
``conveyor.api.notifications`` and ``conveyor.api.email_templates``.

How its settings are written (the SMTP URL, the allow list, the webhook secret)
is checked by ``conveyor.settings`` at start-up, like every other setting.
"""
