// /docs: Swagger UI over the proxy's own /openapi.json. "Authorize" takes an
// API key (X-API-Key or Bearer); "Try it out" then calls the proxy from this
// page (same origin: no CORS involved). Nothing is fetched from elsewhere:
// no validator badge, no external fonts.
window.ui = SwaggerUIBundle({
  url: '/openapi.json',
  dom_id: '#swagger-ui',
  deepLinking: true,
  validatorUrl: null,
  displayRequestDuration: true,
  showMutatedRequest: true,
});
